"""Fixtures every test file may use: paths of the shared real data, the generated datasets,
the random-weight checkpoints of the backbones without packaged weights, HOME isolation and a
CLI runner. Generators of test material that are plain functions live in helpers.py."""

import gc
import os

# Before torch is imported anywhere: avoid OpenMP spin-waiting (see embedkit.cli.main).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
from pathlib import Path

# Temporary folders (tmp_path, tmp_path_factory) in RAM where there is a tmpfs: every artefact
# embedkit writes is fsynced (embedkit.io.atomic_write), ~3 ms a file on a disk, ~1000 files a
# run. Same pytest layout (pytest-of-USER/pytest-N, the last 3 kept), only the root differs;
# PYTEST_DEBUG_TEMPROOT set by the caller wins.
_SHM = Path("/dev/shm")
if "PYTEST_DEBUG_TEMPROOT" not in os.environ and _SHM.is_dir() and os.access(_SHM, os.W_OK | os.X_OK):
    os.environ["PYTEST_DEBUG_TEMPROOT"] = str(_SHM)

import numpy as np  # noqa: E402 (after the environment set above)
import pytest  # noqa: E402


# The cyclic garbage collector: with torch, scikit-learn, transformers and onnxscript imported the
# heap holds millions of long-lived objects, and every full collection walked all of them (~0.4 s
# each, ~18 s of a fast-tier run). Freezing what is alive after collection, and again before each
# test file's first test (after a full collection, so no garbage is frozen), leaves the collector
# only the objects the tests themselves create. Module-scoped fixtures of the previous file are
# torn down by then; what gets frozen is imported modules and session fixtures, alive to the end.
def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()


_frozen_for = [None]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if item.module is not _frozen_for[0]:
        _frozen_for[0] = item.module
        gc.collect()
        gc.freeze()


ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EMBEDKIT_SHARED", ROOT.parent / "shared"))
GTZAN = SHARED / "data" / "gtzan_mini"
FMA_SAMPLE = SHARED / "data" / "fma_sample" / "000002.mp3"
GOLDEN = SHARED / "golden"
DATA = Path(__file__).resolve().parent / "data"  # small golden files kept in the repository

needs_shared = pytest.mark.skipif(not GTZAN.exists(), reason=f"real data not found at {GTZAN} (../shared absent)")

#: environment variables that point embedkit at weights; a test run starts without them
WEIGHT_VARS = ("EMBEDKIT_PANNS_CNN14", "EMBEDKIT_PANNS_CNN10", "EMBEDKIT_AST_MODEL")


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """Every test runs with HOME in a temporary folder, so none can read or write the user's
    home (caches, weight downloads); tests that prove nothing is written use ``clean_home``."""
    with pytest.MonkeyPatch.context() as mp:
        home = tmp_path_factory.mktemp("home")
        mp.setenv("HOME", str(home))
        for v in WEIGHT_VARS:
            mp.delenv(v, raising=False)
        yield home


@pytest.fixture
def clean_home(tmp_path, monkeypatch):
    """An empty HOME of this test's own (and no weight env vars): the test can assert that
    nothing was written to it."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for v in WEIGHT_VARS:
        monkeypatch.delenv(v, raising=False)
    return home


@pytest.fixture
def cli():
    """``cli(args)`` -> click Result of ``embedkit <args>`` run in-process."""
    from typer.testing import CliRunner

    from embedkit.cli import app

    return lambda args: CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory):
    """4 classes x 5 clips of 12 s at 22.05 kHz (WAV), generated once per session."""
    from embedkit.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth"), n_classes=4, per_class=5, duration_s=12.0)


@pytest.fixture(scope="session")
def synth_tracks(synth_dataset):
    """The track table of ``synth_dataset``."""
    from embedkit.datasets import load_dataset

    return load_dataset(synth_dataset)


@pytest.fixture(scope="session")
def panns_checkpoint(tmp_path_factory):
    """``panns_checkpoint(arch)``: one seeded random checkpoint per architecture per session,
    in the official layout with NumPy sampler state."""

    def get(arch: str) -> Path:
        from embedkit.backbones import panns

        p = tmp_path_factory.getbasetemp() / "panns-random" / f"{arch}_seed0.pth"
        if not p.exists():
            panns.write_random_checkpoint(p, arch, seed=0)
        return p

    return get


@pytest.fixture(scope="session")
def ast_tiny_dir(tmp_path_factory):
    """A tiny random AST with an AudioSet head, in save_pretrained layout (needs transformers)."""
    pytest.importorskip("transformers")
    from embedkit.backbones import ast

    p = tmp_path_factory.getbasetemp() / "ast-random" / "tiny_head_seed0"
    if not (p / "config.json").exists():
        ast.write_random_model(p, seed=0, classifier=True)
    return p


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---------------------------------------------------------------------------------------------
# One finished run of each kind (tagging, streaming, export and serving tests share them)


@pytest.fixture(scope="session", autouse=True)
def _private_tagger_cache(tmp_path_factory):
    """Taggers cache their numpy head form under a temporary folder, never the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EMBEDKIT_TAGGER_CACHE", str(tmp_path_factory.getbasetemp() / "tagger-cache"))
        yield


@pytest.fixture(scope="session")
def tracks(synth_dataset):
    """The track table of ``synth_dataset`` (the runs below are trained on it)."""
    from embedkit.datasets import load_dataset

    return load_dataset(synth_dataset)


@pytest.fixture(scope="session")
def runs(tracks, tmp_path_factory, synth_dataset):
    """One finished run of each kind on the synthetic dataset (12 s clips, tiny models)."""
    from embedkit.cnn.features import FeatureConfig
    from embedkit.cnn.finetune import FinetuneConfig, finetune
    from embedkit.cnn.train import TrainConfig, train_cnn
    from embedkit.config import AudioConfig, PreprocessConfig, SegmentConfig
    from embedkit.extract import extract
    from embedkit.fit import fit_head

    tmp = tmp_path_factory.mktemp("runs")
    extract(
        tracks,
        "tiny-test",
        cache=tmp / "cache",
        prep=PreprocessConfig(AudioConfig(clip_s=12.0), SegmentConfig(5.0, 5.0)),
        workers=1,
    )
    head = fit_head("tiny-test", "lr", cache=tmp / "cache", runs=tmp / "runs", name="lr").run_dir
    mlp = fit_head(
        "tiny-test", "mlp", cache=tmp / "cache", runs=tmp / "runs", name="mlp", pca=8, params={"max_epochs": 3}
    ).run_dir
    train = TrainConfig(epochs=2, batch_size=4, crop="fixed")
    cnn = train_cnn(
        tracks,
        cv=None,
        train=train,
        channels=(4, 8),
        features=FeatureConfig(),  # 44.1 kHz / 128 mels (a rate other than tiny-test's 22.05 kHz)
        audio_cfg=AudioConfig(clip_s=12.0),
        runs_dir=tmp / "runs",
        cache=tmp / "cache",
        threads=1,
        workers=1,
    ).run_dir
    ft = finetune(
        tracks,
        "tiny-test",
        train=train,
        ft=FinetuneConfig("tiny-test", frozen_epochs=1),
        audio_cfg=AudioConfig(clip_s=12.0),
        runs_dir=tmp / "runs",
        cache=tmp / "cache",
        threads=1,
        workers=1,
    ).run_dir
    return {"head": head, "mlp": mlp, "cnn": cnn, "finetune": ft, "cache": tmp / "cache", "data": synth_dataset}


@pytest.fixture(scope="session")
def tiny_store(synth_dataset, tmp_path_factory):
    """The cache folder holding ``synth_dataset`` extracted with the tiny-test backbone at the
    default preprocessing. Shared (fit, export, serve tests): read it, never extract into it."""
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract

    cache = tmp_path_factory.mktemp("tiny-store")
    extract(load_dataset(synth_dataset), "tiny-test", cache=cache, workers=2)
    return cache


@pytest.fixture(scope="session")
def tiny_holdout_run(tiny_store, tmp_path_factory):
    """A tiny-test + lr head run on ``tiny_store``, holdout protocol (export and serve tests)."""
    from embedkit.fit import fit_head

    runs = tmp_path_factory.mktemp("tiny-runs")
    return fit_head("tiny-test", "lr", cache=tiny_store, runs=runs, protocol="holdout").run_dir
