"""Embeddings belong to a file's content (issue 10): the store keys rows by the fingerprint of the
audio bytes, so two datasets sharing relative paths, a file replaced in place, the same audio
under two names and a failure whose file was fixed each get the right rows; `fit`/`predict`
join the dataset with the store; a no-op re-run reads no audio and builds no model; 0.1.0
stores are upgraded in place; kill -9 during a second dataset resumes cleanly; a property test
over random interleavings of extract calls."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst
from typer.testing import CliRunner

from embedkit import identity
from embedkit.config import AudioConfig, PreprocessConfig, SegmentConfig
from embedkit.datasets import load_dataset
from embedkit.extract import extract
from embedkit.fit import read_embeddings
from embedkit.store import find_store

runner = CliRunner()
SR = 22050
# melstats (no weights, no torch) on 2 s clips cut into 1 s segments: 2 rows per file, fast.
PREP = PreprocessConfig(AudioConfig(clip_s=2.0), SegmentConfig(1.0, 1.0))
FAST = ["--backbone", "melstats", "--clip", "2", "--segment", "1"]


def cli(*args):
    res = runner.invoke(app(), [str(a) for a in args])
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


def app():
    from embedkit.cli import app as typer_app

    return typer_app


def signal_of(kind: str, seed: int, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    if kind == "tone":
        return (0.3 * np.sin(2 * np.pi * seed * t)).astype(np.float32)
    return (0.1 * np.random.default_rng(seed).standard_normal(len(t))).astype(np.float32)


_stamp = [1_600_000_000_000_000_000]


def write(path: Path, y: np.ndarray) -> Path:
    """Write a WAV with a fresh, strictly increasing mtime (an in-place replacement within one
    clock tick must still look changed, as it would to a person editing the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, y, SR)
    _stamp[0] += 1_000_000_000
    os.utime(path, ns=(_stamp[0], _stamp[0]))
    return path


def reference(y: np.ndarray, tmp: Path) -> np.ndarray:
    """The embedding rows of one signal extracted alone in a fresh cache (the truth)."""
    d = tmp / f"ref-{len(list(tmp.glob('ref-*')))}"
    write(d / "x" / "a.wav", y)
    res = extract(load_dataset(d), "melstats", cache=d / "cache", prep=PREP, workers=1)
    return res.store.read()[1]


def rows_of(store, data: Path) -> dict[str, np.ndarray]:
    seg, X = read_embeddings(store, tracks=load_dataset(data))
    return {t: X[seg.index[seg.track_id == t]] for t in seg.track_id.unique()}


def summary(res) -> str:
    return next(line for line in res.stderr.splitlines() if "tracks extracted" in line)


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_issue_reproduction_two_datasets_same_paths_different_audio(tmp_path):
    d1, d2, cache = tmp_path / "d1", tmp_path / "d2", tmp_path / "cache"
    write(d1 / "a" / "x.wav", signal_of("tone", 220))
    write(d2 / "a" / "x.wav", signal_of("tone", 880))
    write(d1 / "b" / "y.wav", signal_of("noise", 1))
    write(d2 / "b" / "y.wav", signal_of("noise", 2))
    first = cli("extract", d1, *FAST, "--cache", cache)
    assert first.exit_code == 0 and "2 tracks extracted (4 segments), 0 already done" in summary(first)
    second = cli("extract", d2, *FAST, "--cache", cache)
    assert second.exit_code == 0 and "2 tracks extracted (4 segments), 0 already done" in summary(second)
    store = find_store(cache, "melstats")
    assert len(store.read()[0]) == 8  # two stores' worth of rows
    for data in (d1, d2):  # each dataset reads back its own audio, never the other's
        got = rows_of(store, data)
        for tid, (kind, seed) in {
            "a/x": ("tone", 220 if data == d1 else 880),
            "b/y": ("noise", 1 if data == d1 else 2),
        }.items():
            np.testing.assert_allclose(got[tid], reference(signal_of(kind, seed), tmp_path), atol=1e-5)
    assert not np.allclose(rows_of(store, d1)["a/x"], rows_of(store, d2)["a/x"])


def test_file_replaced_in_place_is_reextracted_and_supersedes_its_old_rows(tmp_path):
    d, cache = tmp_path / "d", tmp_path / "cache"
    write(d / "a" / "x.wav", signal_of("tone", 220))
    write(d / "b" / "y.wav", signal_of("noise", 1))
    assert cli("extract", d, *FAST, "--cache", cache).exit_code == 0
    write(d / "a" / "x.wav", signal_of("tone", 880))  # same path, same size, new audio
    again = cli("extract", d, *FAST, "--cache", cache)
    assert "1 tracks extracted (2 segments), 1 already done" in summary(again)
    got = rows_of(find_store(cache, "melstats"), d)
    assert len(got["a/x"]) == 2  # superseded, not duplicated
    np.testing.assert_allclose(got["a/x"], reference(signal_of("tone", 880), tmp_path), atol=1e-5)


def test_same_audio_under_two_names_and_moved_is_extracted_once(tmp_path):
    d, moved, cache = tmp_path / "d", tmp_path / "moved", tmp_path / "cache"
    y = signal_of("tone", 330)
    write(d / "a" / "x.wav", y)
    (d / "b").mkdir()
    (d / "b" / "copy.wav").write_bytes((d / "a" / "x.wav").read_bytes())
    res = cli("extract", d, *FAST, "--cache", cache)
    assert "2 tracks extracted (2 segments)" in summary(res) and "2 share their audio with another track" in summary(
        res
    )
    store = find_store(cache, "melstats")
    assert len(store.read()[0]) == 2  # one audio content, two segments
    got = rows_of(store, d)
    np.testing.assert_array_equal(got["a/x"], got["b/copy"])
    (moved / "c").mkdir(parents=True)
    os.replace(d / "b" / "copy.wav", moved / "c" / "elsewhere.wav")  # moved to another folder
    res = cli("extract", moved, *FAST, "--cache", cache)
    assert "0 tracks extracted (0 segments), 1 already done" in summary(res)
    np.testing.assert_array_equal(rows_of(store, moved)["c/elsewhere"], got["a/x"])


def test_failure_is_retried_once_the_content_changes(tmp_path):
    d, cache = tmp_path / "d", tmp_path / "cache"
    write(d / "a" / "good.wav", signal_of("tone", 220))
    (d / "a" / "bad.wav").write_bytes(b"RIFF not really a wave file")
    assert "1 tracks extracted (2 segments), 0 already done, 1 failed" in summary(
        cli("extract", d, *FAST, "--cache", cache)
    )
    assert "(+1 failed in earlier runs" in summary(cli("extract", d, *FAST, "--cache", cache))
    write(d / "a" / "bad.wav", signal_of("noise", 3))  # fixed by the user
    assert "1 tracks extracted (2 segments), 1 already done, 0 failed," in summary(
        cli("extract", d, *FAST, "--cache", cache)
    )


def synth(root: Path, seed: int) -> Path:
    from embedkit.synth import make_dataset

    return make_dataset(root, n_classes=3, per_class=6, duration_s=2.0, seed=seed)


def fit_cli(runs: Path, *args) -> dict:
    res = cli("fit", *args, "--backbone", "melstats", "--cv", "3", "--runs", runs)
    assert res.exit_code == 0, res.stderr
    (run,) = [p for p in runs.iterdir() if (p / "metrics.json").exists()]
    return {
        "metrics": json.loads((run / "metrics.json").read_text()),
        "pred": pd.read_csv(run / "predictions.csv"),
        "out": res.stderr,
    }


@pytest.mark.slow  # several seconds: the fast tier keeps a minute
def test_two_datasets_in_one_cache_fit_as_in_separate_caches_and_fit_without_data_is_the_last(tmp_path):
    d1, d2 = synth(tmp_path / "d1", seed=1), synth(tmp_path / "d2", seed=2)  # same relative names, other audio
    shared = tmp_path / "shared"
    for d in (d1, d2):
        assert cli("extract", d, *FAST, "--cache", shared).exit_code == 0
        assert cli("extract", d, *FAST, "--cache", tmp_path / f"alone-{d.name}").exit_code == 0
    for d in (d1, d2):
        together = fit_cli(tmp_path / f"runs-shared-{d.name}", d, "--cache", shared)
        alone = fit_cli(tmp_path / f"runs-alone-{d.name}", d, "--cache", tmp_path / f"alone-{d.name}")
        assert together["metrics"]["track_accuracy"] == alone["metrics"]["track_accuracy"]
        assert together["metrics"]["dataset"]["n_tracks"] == 18 and together["metrics"]["dataset"]["source"] == str(d)
        pd.testing.assert_frame_equal(together["pred"], alone["pred"])
    # no DATA: the dataset extracted last into the store (d2), never a mixture of both
    last = fit_cli(tmp_path / "runs-last", "--cache", shared)
    assert last["metrics"]["dataset"]["source"] == str(d2) and last["metrics"]["dataset"]["n_tracks"] == 18
    assert f"dataset: {d2} (the last one extracted into" in last["out"]
    pd.testing.assert_frame_equal(last["pred"], fit_cli(tmp_path / "runs-d2-again", d2, "--cache", shared)["pred"])
    # predict follows the same rule: d1's head on d1's audio, then on the last dataset (d2)
    run = next((tmp_path / "runs-shared-d1").iterdir())
    out = tmp_path / "p.csv"
    assert cli("predict", run, d1, "--cache", shared, "-o", out).exit_code == 0
    p1 = pd.read_csv(out)
    assert cli("predict", run, "--cache", shared, "-o", out).exit_code == 0
    p2 = pd.read_csv(out)
    assert sorted(p1.path) == sorted(str(p) for p in load_dataset(d1).path) and sorted(p2.path) == sorted(
        str(p) for p in load_dataset(d2).path
    )
    assert p1["in_training"].all() and not p2["in_training"].any()  # d2's x.00000 is not d1's x.00000


def test_noop_rerun_reads_no_audio_and_builds_no_model(tmp_path, monkeypatch):
    d, cache = tmp_path / "d", tmp_path / "cache"
    write(d / "a" / "x.wav", signal_of("tone", 220))
    write(d / "b" / "y.wav", signal_of("noise", 1))
    assert cli("extract", d, *FAST, "--cache", cache).exit_code == 0
    identity._cache.clear()  # no help from this process's memory: only the store's record

    def forbidden(*a, **k):
        raise AssertionError("a no-op re-run must not do this")

    monkeypatch.setattr("embedkit.extract.load_backbone", forbidden)
    monkeypatch.setattr(identity, "hash_file", forbidden)
    res = cli("extract", d, *FAST, "--cache", cache)
    assert res.exit_code == 0 and "0 tracks extracted (0 segments), 2 already done" in summary(res)
    # fit with DATA finds the fingerprints the same way
    assert len(read_embeddings(find_store(cache, "melstats"), tracks=load_dataset(d))[0]) == 4


def test_weights_id_known_without_building_the_network():
    from embedkit.backbones import identify_weights, load_backbone
    from embedkit.backbones.musicnn import checkpoints_available

    if not checkpoints_available("musicnn-msd"):
        pytest.skip("musicnn checkpoints not found: bash scripts/install.sh")

    wid, spec = identify_weights("musicnn-msd")
    bb = load_backbone("musicnn-msd")
    assert wid == bb.weights_id and spec == bb.spec
    assert identify_weights("melstats")[0] == "none" and identify_weights("tiny-test") is None


def test_file_changed_during_extraction_is_not_stored_under_the_old_fingerprint(tmp_path):
    from embedkit.extract import _decode_safe

    p = write(tmp_path / "x.wav", signal_of("tone", 220))
    st = os.stat(p)
    ok, err, _ = _decode_safe(str(p), SR, PREP, (st.st_size, st.st_mtime_ns, st.st_ino))
    assert err is None and ok[0].shape == (2, SR)
    _, err, _ = _decode_safe(str(p), SR, PREP, (st.st_size, st.st_mtime_ns - 1, st.st_ino))
    assert err == "file changed while it was being extracted; run extract again"


def make_legacy(store) -> None:
    """Turn a store into what embedkit 0.1.0 wrote: no fingerprint column, no layout, no datasets."""
    import shutil

    for f in store.shard_files("segments") + store.shard_files("failures"):
        t = pq.read_table(f)
        pq.write_table(t.drop(["fingerprint"]), f)
    meta = store.meta()
    del meta["layout"]
    store.meta_path.write_text(json.dumps(meta))
    shutil.rmtree(store.datasets_dir)


def test_0_1_0_store_is_refused_by_fit_and_upgraded_in_place_by_extract(tmp_path):
    d, cache = tmp_path / "d", tmp_path / "cache"
    write(d / "a" / "x.wav", signal_of("tone", 220))
    write(d / "a" / "y.wav", signal_of("noise", 1))
    write(d / "b" / "z.wav", signal_of("noise", 2))
    assert cli("extract", d, *FAST, "--cache", cache).exit_code == 0
    store = find_store(cache, "melstats")
    before = rows_of(store, d)
    make_legacy(store)
    res = cli("fit", "--backbone", "melstats", "--cache", cache, "--runs", tmp_path / "runs")
    assert res.exit_code == 1
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert (
        "written by embedkit 0.1.0" in line
        and "embedkit extract DATA --backbone melstats" in line
        and "upgrade it in place" in line
    )
    time.sleep(0.01)
    sf.write(
        d / "b" / "z.wav", signal_of("noise", 9), SR
    )  # edited after the shard was written: its rows cannot be trusted
    res = cli("extract", d, *FAST, "--cache", cache)
    assert "1 tracks extracted (2 segments), 2 already done" in summary(res)
    assert not store.is_legacy() and all("fingerprint" in pq.read_schema(f).names for f in store.shard_files())
    after = rows_of(store, d)
    for t in ("a/x", "a/y"):
        np.testing.assert_array_equal(after[t], before[t])
    np.testing.assert_allclose(after["b/z"], reference(signal_of("noise", 9), tmp_path), atol=1e-5)


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from embedkit.config import AudioConfig, PreprocessConfig, SegmentConfig
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract
    def slow(done, total):
        time.sleep(0.3)  # leave the parent time to kill us between and during shard writes
    extract(load_dataset(sys.argv[1]), "melstats", cache=sys.argv[2], shard_size=1, workers=1,
            prep=PreprocessConfig(AudioConfig(clip_s=2.0), SegmentConfig(1.0, 1.0)), progress=slow)
    """
)


@pytest.mark.slow
def test_kill_9_during_the_second_dataset_resumes_without_duplicates(tmp_path):
    d1, d2, cache = synth(tmp_path / "d1", seed=1), synth(tmp_path / "d2", seed=2), tmp_path / "cache"
    extract(load_dataset(d1), "melstats", cache=cache, prep=PREP, workers=1)
    store = find_store(cache, "melstats")
    n1 = len(store.shard_files())
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(d2), str(cache)], stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(store.shard_files()) < n1 + 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert n1 + 3 <= len(store.shard_files()) < n1 + 18  # killed mid-run
    res = extract(load_dataset(d2), "melstats", cache=cache, prep=PREP, workers=1)
    assert res.n_done_before >= 3 and res.n_done_before + res.n_extracted == 18 and res.n_failed == 0
    meta, _ = store.read()
    assert len(meta) == 2 * 36 and not meta.duplicated(["fingerprint", "segment"]).any()
    for d in (d1, d2):
        seg, X = read_embeddings(store, tracks=load_dataset(d))
        alone = extract(load_dataset(d), "melstats", cache=tmp_path / f"alone-{d.name}", prep=PREP, workers=1).store
        seg_a, X_a = read_embeddings(alone, tracks=load_dataset(d))
        pd.testing.assert_frame_equal(seg[["track_id", "segment"]], seg_a[["track_id", "segment"]])
        np.testing.assert_allclose(X, X_a, atol=1e-5)


def test_clip_cache_follows_the_content_rule(tmp_path):
    from embedkit.cnn.features import ClipCache

    a = write(tmp_path / "a.wav", signal_of("tone", 220))
    b = tmp_path / "b.wav"
    b.write_bytes(a.read_bytes())
    calls = []

    def compute(p):
        calls.append(p)
        return sf.read(p, dtype="float32")[0][:10]

    cache = ClipCache(tmp_path / "cache", "cnn-wave", {"t": 1}, compute)
    arrays, _ = cache.build([str(a), str(b)], workers=1)
    assert len(calls) == 1 and np.array_equal(arrays[0], arrays[1])  # same audio, one array
    write(a, signal_of("tone", 880))  # edited in place: computed again
    identity._cache.clear()
    arrays2, _ = cache.build([str(a), str(b)], workers=1)
    assert len(calls) == 2 and not np.array_equal(arrays2[0], arrays2[1])
    assert len(identity.load_known(tmp_path / "cache" / "fingerprints.json")) == 2


# ---------------------------------------------------------------------------------------------
# property: random interleavings of extract calls over datasets sharing names and contents

CONTENTS = [("tone", 220), ("tone", 660), ("noise", 1), ("noise", 2)]
NAMES = ["a/x", "a/y", "b/x"]
_REF: dict[int, np.ndarray] = {}


def _reference(i: int) -> np.ndarray:
    if i not in _REF:
        with tempfile.TemporaryDirectory() as tmp:
            _REF[i] = reference(signal_of(*CONTENTS[i]), Path(tmp))
    return _REF[i]


# each step: (dataset 0..2, content 0..3 or None for each name); then extract that dataset
STEP = hst.tuples(hst.integers(0, 2), hst.lists(hst.one_of(hst.none(), hst.integers(0, 3)), min_size=3, max_size=3))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=hst.lists(STEP, min_size=1, max_size=4))
@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_every_dataset_track_reads_back_its_own_audio(steps):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cache = root / "cache"
        state: dict[int, dict[str, int]] = {}
        for ds, assign in steps:
            d = root / f"d{ds}"
            files = {n: c for n, c in zip(NAMES, assign) if c is not None} or {NAMES[0]: 0}
            for n in NAMES:
                p = d / f"{n}.wav"
                if n not in files and p.exists():
                    p.unlink()
                elif n in files and state.get(ds, {}).get(n) != files[n]:
                    write(p, signal_of(*CONTENTS[files[n]]))
            state[ds] = files
            extract(load_dataset(d), "melstats", cache=cache, prep=PREP, workers=1)
            store = find_store(cache, "melstats")
            assert store.dataset_tracks().attrs["source"] == str(d)  # fit without DATA: the last one
            for other, have in state.items():
                seg, X = read_embeddings(store, tracks=load_dataset(root / f"d{other}"))
                got = set(seg.track_id)
                assert got == set(have)  # each dataset was extracted after its last change: complete
                for tid in got:
                    np.testing.assert_allclose(X[(seg.track_id == tid).to_numpy()], _reference(have[tid]), atol=1e-5)
            meta, _ = store.read()
            assert not meta.duplicated(["fingerprint", "segment"]).any()


def test_same_audio_never_straddles_a_split(tmp_path):
    """Two files with the same bytes (a duplicated clip) are one group for every protocol that
    splits: they land on the same side of each CV fold and of the holdout."""
    from embedkit.evaluate import make_folds

    rows = []
    for label in ("a", "b"):
        for i in range(6):
            f = tmp_path / label / f"{i}.wav"
            f.parent.mkdir(exist_ok=True)
            sf.write(f, signal_of("tone", 200 + 50 * i + (0 if label == "a" else 17)), SR)
            rows.append(f)
    dup = tmp_path / "a" / "copy_of_0.wav"
    dup.write_bytes((tmp_path / "a" / "0.wav").read_bytes())
    tracks = identity.with_fingerprints(load_dataset(tmp_path))
    assert tracks["fingerprint"].duplicated().sum() == 1
    pair = {"a/0", "a/copy_of_0"}
    for protocol, k in (("cv", 3), ("holdout", 5)):
        for seed in range(5):
            for fold in make_folds(tracks, protocol, k=k, seed=seed):
                assert pair <= set(fold.train) or pair <= set(fold.test), (protocol, seed, fold.name)
    # Without fingerprints (no duplicate known) the rule is not applied: folds as before.
    plain = make_folds(tracks.drop(columns="fingerprint"), "cv", k=3, seed=0)
    assert sorted(t for f in plain for t in f.test) == sorted(tracks.track_id)


def test_run_identity_follows_file_content(tmp_path):
    """The pipeline's run ids hash the dataset's contents: a file replaced in place (same path,
    same label) makes a new dataset fingerprint, so no finished run is reused for it."""
    from embedkit.runs import dataset_fingerprint

    for label in ("a", "b"):
        (tmp_path / label).mkdir()
        sf.write(tmp_path / label / "x.wav", signal_of("tone", 300 if label == "a" else 500), SR)
    tracks = load_dataset(tmp_path)
    before = dataset_fingerprint(tracks)
    assert dataset_fingerprint(identity.with_fingerprints(tracks)) == before  # one rule either way
    time.sleep(0.01)
    sf.write(tmp_path / "a" / "x.wav", signal_of("noise", 1), SR)
    assert dataset_fingerprint(load_dataset(tmp_path)) != before


def test_the_process_cache_is_bounded_and_keeps_the_recently_used(tmp_path, monkeypatch):
    monkeypatch.setattr(identity, "CACHE_SIZE", 3)
    identity._cache.clear()
    files = []
    for i in range(5):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(bytes([i]) * 10)
        files.append(p)
    first = identity.fingerprint(files[0])
    for p in files[1:3]:
        identity.fingerprint(p)
    identity.fingerprint(files[0])  # used again: the least recently used is now files[1]
    for p in files[3:]:
        identity.fingerprint(p)
    assert len(identity._cache) == 3
    cached = {st.path for st, _ in identity._cache}
    assert str(files[0].resolve()) in cached and str(files[1].resolve()) not in cached
    assert identity.fingerprint(files[0]) == first == identity.hash_file(files[0])
