"""`--device` wired through every network-running command and library call: clear CLI errors,
device-free artefacts with device provenance, the OOM back-off inside extraction, bf16
autocast, the CPU-only allocator trick, and (where a CUDA device exists) parity with the CPU.

CUDA tests skip with a reason on machines without one; everything else runs on the CPU."""

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from typer.testing import CliRunner

torch = pytest.importorskip("torch")

from embedkit import device  # noqa: E402
from embedkit.cli import app  # noqa: E402
from embedkit.config import AudioConfig, PreprocessConfig, SegmentConfig  # noqa: E402
from embedkit.errors import DeviceError  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
PREP = PreprocessConfig(AudioConfig(clip_s=10.0), SegmentConfig(5.0, 5.0))
runner = CliRunner()


def _cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    return res


def _error_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert res.exit_code == 1 and len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tracks(synth_dataset):
    from embedkit.datasets import load_dataset

    return load_dataset(synth_dataset)


# -- one-line CLI errors -----------------------------------------------------------------------


@no_cuda
@pytest.mark.parametrize("command", ["extract", "tag", "stream", "serve", "train-cnn", "finetune", "run"])
def test_cuda_without_cuda_is_one_line_for_every_command(command, synth_dataset, tmp_path):
    args = {
        "extract": ["extract", synth_dataset, "-b", "tiny-test", "--cache", tmp_path],
        "tag": ["tag", tmp_path / "no-such-run", synth_dataset],
        "stream": ["stream", tmp_path / "no-such-run", "-"],
        "serve": ["serve", tmp_path / "no-such-run"],
        "train-cnn": ["train-cnn", synth_dataset, "--runs", tmp_path],
        "finetune": ["finetune", synth_dataset, "-b", "tiny-test", "--runs", tmp_path],
        "run": ["run", synth_dataset, "--quick", "--runs", tmp_path, "--cache", tmp_path],
    }[command]
    line = _error_line(_cli(*args, "--device", "cuda"))
    assert "device 'cuda': CUDA is not available" in line and "use cpu or auto" in line
    assert not list(tmp_path.iterdir())  # nothing was started


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS may have MPS")
def test_mps_off_macos_is_one_line(synth_dataset, tmp_path):
    line = _error_line(_cli("extract", synth_dataset, "-b", "tiny-test", "--cache", tmp_path, "--device", "mps"))
    assert "Apple's MPS exists only on macOS" in line


def test_bad_device_and_precision_are_one_line(synth_dataset, tmp_path):
    assert "unknown device 'gpu'" in _error_line(
        _cli("extract", synth_dataset, "-b", "tiny-test", "--cache", tmp_path, "--device", "gpu")
    )
    assert "unknown precision 'fp8'" in _error_line(
        _cli("extract", synth_dataset, "-b", "tiny-test", "--cache", tmp_path, "--precision", "fp8")
    )
    line = _error_line(_cli("tag", tmp_path / "no-such-run", synth_dataset, "--device", "cpu", "--precision", "fp16"))
    assert "'fp16' needs an accelerator" in line


# -- extraction ----------------------------------------------------------------------------------


def test_extract_on_cpu_records_the_device_outside_the_store_key(tracks, tmp_path):
    from embedkit.extract import extract

    plain = extract(tracks, "tiny-test", cache=tmp_path / "a", prep=PREP, workers=1)
    on_cpu = extract(tracks, "tiny-test", cache=tmp_path / "b", prep=PREP, workers=1, device="cpu", batch_size=None)
    assert plain.store.root.name == on_cpu.store.root.name  # the key has no device
    meta = json.loads((on_cpu.store.root / "store.json").read_text())
    assert meta["devices"]["last"] == {"device": "cpu", "name": device.describe("cpu")["name"], "precision": "fp32"}
    assert on_cpu.device == meta["devices"]["last"]
    np.testing.assert_array_equal(
        plain.store.read()[1], on_cpu.store.read()[1]
    )  # batch None = 32 on the CPU: same rows
    # the device stays out of the shards' own metadata (shards do not depend on the device)
    import pyarrow.parquet as pq

    shard = on_cpu.store.shard_files()[0]
    assert b"devices" not in pq.read_schema(shard).metadata[b"embedkit"]


def test_executor_workers_get_the_device_name(tracks, tmp_path):
    from embedkit.extract import extract

    with ThreadPoolExecutor(2) as ex:
        res = extract(tracks, "tiny-test", cache=tmp_path, prep=PREP, workers=1, executor=ex, device="cpu")
    local = extract(tracks, "tiny-test", cache=tmp_path / "local", prep=PREP, workers=1)
    assert json.loads((res.store.root / "store.json").read_text())["devices"]["used"][0]["device"] == "cpu"
    np.testing.assert_array_equal(res.store.read()[1], local.store.read()[1])


def test_out_of_memory_inside_extraction_backs_off_and_keeps_every_row(tracks, tmp_path, monkeypatch):
    """A batch too large for the accelerator is halved (warned once per halving) and the store
    holds exactly the rows of a run that never ran out of memory."""
    from embedkit.backbones import load_backbone
    from embedkit.extract import extract

    ref = extract(tracks, "tiny-test", cache=tmp_path / "ref", prep=PREP, workers=1, batch_size=8)
    bb = load_backbone("tiny-test")
    real = bb.embed
    sizes = []

    def embed(x):
        if len(x) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        sizes.append(len(x))
        return real(x)

    monkeypatch.setattr(bb, "embed", embed)
    # the accelerator's path (forwards batched across a shard's tracks), run on the CPU
    monkeypatch.setattr("embedkit.extract.is_accelerator", lambda dev: True)
    with pytest.warns(UserWarning, match="batch size lowered") as caught:
        res = extract(tracks, bb, cache=tmp_path / "oom", prep=PREP, workers=1, batch_size=8)
    # lowered once per halving (8 -> 4 -> 2), then remembered for the later batches of the shard
    assert [str(w.message) for w in caught] == [
        "out of accelerator memory: batch size lowered to 4",
        "out of accelerator memory: batch size lowered to 2",
    ] * len(res.store.shard_files())
    assert max(sizes) <= 3 and res.n_failed == 0
    np.testing.assert_allclose(res.store.read()[1], ref.store.read()[1], atol=1e-6)


def test_bf16_autocast_on_cpu_is_close_to_fp32_and_not_equal(rng):
    from embedkit.backbones import load_backbone

    x = rng.standard_normal((4, 5 * 16000)).astype(np.float32) * 0.1
    bb = load_backbone("tiny-test")
    fp32 = bb.embed(x)
    bf16 = bb.to("cpu", precision="bf16").embed(x)
    assert bb.precision == "bf16" and bf16.dtype == np.float32
    diff = np.abs(bf16 - fp32).max()
    assert 0 < diff < 0.05 * np.abs(fp32).max()  # bf16 has an 8-bit mantissa: ~1e-2 relative
    np.testing.assert_array_equal(bb.to("cpu", precision="fp32").embed(x), fp32)
    with pytest.raises(DeviceError, match="needs an accelerator"):
        bb.to("cpu", precision="fp16")


# -- tagging and streaming ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cnn_run(tracks, tmp_path_factory):
    from embedkit.cnn.train import TrainConfig, train_cnn

    tmp = tmp_path_factory.mktemp("devrun")
    res = train_cnn(
        tracks,
        cv=None,
        train=TrainConfig(epochs=1, batch_size=4, crop="fixed"),
        channels=(4, 8),
        audio_cfg=AudioConfig(clip_s=12.0),
        runs_dir=tmp / "runs",
        cache=tmp / "cache",
        threads=1,
        workers=1,
        device="cpu",
    )
    return res


def test_training_records_its_device_and_checkpoints_hold_cpu_tensors(cnn_run):
    assert cnn_run.metrics["device"]["device"] == "cpu" and cnn_run.metrics["device"]["precision"] == "fp32"
    ck = torch.load(cnn_run.run_dir / "model.pt", map_location="cpu", weights_only=True)
    assert all(v.device.type == "cpu" for v in ck["state_dict"].values())
    from embedkit.runs import RunRecord

    assert RunRecord.from_metrics(cnn_run.metrics).device == cnn_run.metrics["device"]


def test_load_tagger_on_cpu_and_tag_report_the_device(cnn_run, tracks, tmp_path):
    from embedkit.deploy.batch import tag
    from embedkit.deploy.tagger import load_tagger

    t = load_tagger(cnn_run.run_dir)
    on = load_tagger(cnn_run.run_dir, device="cpu")
    assert on.device == torch.device("cpu") and on.precision == "fp32"
    w = on.clip_windows(tracks.path.iloc[0])[0]
    np.testing.assert_array_equal(on.predict_segments(w), t.predict_segments(w))
    res = tag(cnn_run.run_dir, list(tracks.path[:3]), device="cpu", batch_size=None, keep_rows=3)
    assert res.device["device"] == "cpu" and res.n_tagged == 3
    bf = load_tagger(cnn_run.run_dir, device="cpu", precision="bf16").predict_segments(w)
    assert np.abs(bf - t.predict_segments(w)).max() < 0.05  # probabilities under bf16 autocast
    with pytest.raises(DeviceError):
        load_tagger(cnn_run.run_dir, device="cuda:7" if HAS_CUDA else "cuda")


def test_cli_tag_prints_the_device(cnn_run, tracks):
    res = _cli("tag", cnn_run.run_dir, tracks.path.iloc[0], "--device", "cpu", "--table", "0")
    assert res.exit_code == 0, res.stderr
    assert "device cpu (" in res.stderr


def test_allocator_trick_is_cpu_only(monkeypatch):
    from embedkit.cnn import runs as cnn_runs

    calls = []
    monkeypatch.setattr(cnn_runs, "keep_freed_memory", lambda keep=True: calls.append(keep) or True)

    class Opts:
        device = "cpu"

    @cnn_runs.training_process_settings
    def fake(task, tracks, train, audio_cfg, augment, opts, progress=None):
        return "done"

    assert fake(None, None, None, None, None, Opts()) == "done" and calls == [True, False]
    calls.clear()
    monkeypatch.setattr(
        device, "resolve", lambda name, allow_tf32=False: torch.device("meta")
    )  # an accelerator stand-in
    Opts.device = "cuda"
    assert fake(None, None, None, None, None, Opts()) == "done" and calls == []


# -- where a CUDA device exists ------------------------------------------------------------------


@needs_cuda
def test_cuda_extraction_matches_cpu_store(tracks, tmp_path):
    from embedkit.extract import extract

    cpu = extract(tracks, "tiny-test", cache=tmp_path / "cpu", prep=PREP, workers=1, device="cpu")
    gpu = extract(tracks, "tiny-test", cache=tmp_path / "gpu", prep=PREP, workers=1, device="cuda", batch_size=None)
    assert gpu.device["device"] == "cuda:0" and gpu.store.root.name == cpu.store.root.name
    np.testing.assert_allclose(gpu.store.read()[1], cpu.store.read()[1], atol=1e-4, rtol=1e-4)


@needs_cuda
def test_cuda_tagger_matches_cpu_and_training_runs_there(cnn_run, tracks, tmp_path):
    from embedkit.cnn.train import TrainConfig, train_cnn
    from embedkit.deploy.tagger import load_tagger

    w = load_tagger(cnn_run.run_dir).clip_windows(tracks.path.iloc[0])[0]
    np.testing.assert_allclose(
        load_tagger(cnn_run.run_dir, device="cuda").predict_segments(w),
        load_tagger(cnn_run.run_dir).predict_segments(w),
        atol=1e-5,
    )
    res = train_cnn(
        tracks,
        cv=None,
        train=TrainConfig(epochs=1, batch_size=4, crop="fixed"),
        channels=(4, 8),
        audio_cfg=AudioConfig(clip_s=12.0),
        runs_dir=tmp_path / "runs",
        cache=tmp_path / "cache",
        threads=1,
        workers=1,
        device="cuda",
    )
    assert res.metrics["device"]["device"] == "cuda:0"
    ck = torch.load(res.run_dir / "model.pt", map_location="cpu", weights_only=True)
    assert all(v.device.type == "cpu" for v in ck["state_dict"].values())


def test_report_provenance_shows_each_runs_device(tmp_path):
    from embedkit.report import build_report

    from helpers import make_run

    make_run(
        tmp_path / "runs",
        "head-a",
        "head",
        "musicnn-msd",
        "lr",
        0.8,
        0,
        extra={"device": {"device": "cuda:0", "name": "NVIDIA H200", "precision": "bf16", "allow_tf32": True}},
    )
    make_run(tmp_path / "runs", "head-b", "head", "melstats", "lr", 0.5, 1)  # recorded before devices were
    out, ctx = build_report([tmp_path / "runs"], tmp_path / "report.html")
    rows = {r.label: r.extra["spec_row"]["device"] for r in ctx["runs"]}
    assert sorted(rows.values()) == ["cuda:0 (NVIDIA H200), bf16, TF32", "—"]
    html = out.read_text(encoding="utf-8")
    assert '<th class="l">Device</th>' in html and "cuda:0 (NVIDIA H200), bf16, TF32" in html


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_a_numpy_backbone_reports_the_cpu_whatever_was_asked(tracks, tmp_path):
    from embedkit.deploy.tagger import load_tagger
    from embedkit.extract import extract
    from embedkit.fit import fit_head

    res = extract(
        tracks,
        "melstats",
        cache=tmp_path / "cache",
        prep=PREP,
        workers=1,
        device="auto",
        precision="bf16" if not HAS_CUDA else "fp32",
    )
    assert res.device["device"] == "cpu" and res.device["precision"] == "fp32"  # melstats has no network
    run = fit_head("melstats", "lr", cache=tmp_path / "cache", runs=tmp_path / "runs", name="lr").run_dir
    assert json.loads((run / "metrics.json").read_text())["device"]["device"] == "cpu"  # the store's extraction device
    t = load_tagger(run, device="auto")
    assert t.device == torch.device("cpu") and t.precision == "fp32"


def test_reduced_precision_gets_a_store_of_its_own(tmp_path, synth_tracks):
    """bf16 embeddings differ from fp32 ones (by up to ~2 %): they go to their own store, so a
    store never mixes rows of two precisions; fp32 keeps the key it always had."""
    from embedkit.config import AudioConfig, PreprocessConfig, SegmentConfig
    from embedkit.extract import extract
    from embedkit.store import store_key

    prep = PreprocessConfig(AudioConfig(clip_s=5.0), SegmentConfig(5.0, 5.0))
    tracks = synth_tracks.head(4)
    a = extract(tracks, "tiny-test", cache=tmp_path, prep=prep, workers=1, device="cpu")
    b = extract(tracks, "tiny-test", cache=tmp_path, prep=prep, workers=1, device="cpu", precision="bf16")
    assert a.store.root != b.store.root and b.n_extracted == 4  # nothing reused across precisions
    assert a.store.meta()["precision"] == "fp32" and b.store.meta()["precision"] == "bf16"
    spec = a.store.meta()["backbone"]
    from embedkit.backbones import get_spec

    assert a.store.root.name == store_key(
        a.store.meta()["weights_id"], prep, get_spec(spec["name"])
    )  # fp32: key unchanged
    _, xa = a.store.read()
    _, xb = b.store.read()
    assert not np.array_equal(xa, xb)
