"""The one inference interface: load_tagger for every run kind, parity with each run's own
evaluation, self-contained fine-tuned files, refusals, the numpy head form, the numpy mel."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embedkit.config import AudioConfig, PreprocessConfig, SegmentConfig
from embedkit.deploy.tagger import CNNTagger, FinetuneTagger, HeadTagger, load_tagger, model_id_of
from embedkit.errors import ConfigMismatchError, ModelLoadingError

from conftest import GTZAN, needs_shared

ROOT = Path(__file__).resolve().parents[1]
PREP12 = PreprocessConfig(AudioConfig(clip_s=12.0), SegmentConfig(5.0, 5.0))


def _heldout(run_dir: Path, tracks) -> dict[str, np.ndarray]:
    """The run's own held-out track probabilities (mean over the fixed windows)."""
    d = torch.load(run_dir / "checkpoints" / "holdout.done.pt", weights_only=False)
    owners, proba = d["owners"].numpy(), d["proba"].numpy()
    return {tracks["path"].iloc[o]: proba[owners == o].mean(axis=0) for o in np.unique(owners)}


def test_every_kind_loads_with_its_contract(runs):
    for kind, cls in (("head", HeadTagger), ("cnn", CNNTagger), ("finetune", FinetuneTagger)):
        t = load_tagger(runs[kind])
        assert isinstance(t, cls) and t.kind == kind
        assert t.labels == ["chime", "drone", "noise", "pulse"]
        assert t.run_dir == runs[kind] and t.meta["run_id"] == runs[kind].name
        assert t.model_id == model_id_of(runs[kind]) and len(t.model_id) == 32
        assert t.segment == SegmentConfig(5.0, 5.0) and t.audio.clip_s == 12.0
        x = np.zeros((0, t.window_samples), np.float32)
        assert t.predict_segments(x).shape == (0, 4)
        p = t.predict_segments(0.1 * np.random.default_rng(0).standard_normal((3, t.window_samples)).astype(np.float32))
        assert p.shape == (3, 4) and p.dtype == np.float64 and np.allclose(p.sum(axis=1), 1)
        with pytest.raises(ValueError, match="expected windows"):
            t.predict_segments(np.zeros((2, 100), np.float32))
    h = load_tagger(runs["head"])
    assert h.sample_rate == 16000 and h.backbone.spec.name == "tiny-test" and h.bundle.head == "lr"
    c = load_tagger(runs["cnn"])
    assert c.sample_rate == c.features.sample_rate == 44100 and c.normalizer.mode == "standard"
    # model id: the artefact file's hash, different for every run
    assert len({load_tagger(runs[k]).model_id for k in ("head", "mlp", "cnn", "finetune")}) == 4


def test_head_tagger_equals_predict_on_the_store(runs):
    from embedkit.fit import predict_store

    for run in (runs["head"], runs["mlp"]):
        df, b = predict_store(run / "head.skops", cache=runs["cache"])
        t = load_tagger(run)
        for r in df.itertuples():
            _, p = t.predict_file(r.path)
            np.testing.assert_allclose(
                p, t.calibrate([getattr(r, f"p_{l}") for l in b.labels]), atol=1e-6
            )  # track probabilities are calibrated


def test_finetune_tagger_reproduces_the_held_out_predictions(runs, tracks):
    t = load_tagger(runs["finetune"])
    ref = _heldout(runs["finetune"], tracks)
    for path, p in ref.items():
        np.testing.assert_allclose(t.predict_file(path)[1], p, atol=1e-5)


def test_cnn_tagger_per_window_rule_is_close_to_the_held_out_predictions(runs, tracks):
    """Rule: a window's log-mel is that window's own centred STFT; training evaluated crops of
    the clip's log-mel. The difference is bounded (edge frames, < half a hop of alignment)."""
    from embedkit.cnn.features import logmel

    t = load_tagger(runs["cnn"])
    ref = _heldout(runs["cnn"], tracks)
    worst = 0.0
    for path, p in ref.items():
        windows, starts = t.clip_windows(path)
        np.testing.assert_array_equal(starts, [0.0, 5.0])
        # the net's input: the window's own log-mel, frames whose STFT window lies inside it
        assert t.inside_frames == (2, 429)  # of 431 centred frames of 5 s at 44.1 kHz, n_fft 2048, hop 512
        mel = logmel(windows[1], t.features)[:, 2:429]
        np.testing.assert_allclose(
            t.logmel(windows[1:2])[0],
            (mel - np.array(t.normalizer.mean)[:, None]) / np.array(t.normalizer.std)[:, None],
            atol=1e-4,
        )
        # ... which equal the frames of an STFT that never reads outside the window
        y = windows[1].astype(np.float64)
        w = np.hanning(2049)[:-1]  # periodic Hann, as torch.hann_window
        frame = y[512 * 5 : 512 * 5 + 2048] * w  # frame 7 of the centred grid = frame 5 from the window start + 1024
        power = np.abs(np.fft.rfft(frame)) ** 2
        from embedkit.audio.melspec import mel_filters

        db = 10 * np.log10(np.maximum(mel_filters(44100, 2048, 128) @ power, 1e-10))
        np.testing.assert_allclose(mel[:, 5], db, atol=2e-2)
        worst = max(worst, float(np.abs(t.predict_file(path)[1] - p).max()))
    assert worst < 0.02, worst


def test_old_predict_proba_file_paths_go_through_the_tagger(runs):
    from embedkit.cnn.finetuned import load_finetuned
    from embedkit.cnn.model import load_model

    path = next(runs["data"].glob("*/*.wav"))
    for t, m in (
        (load_tagger(runs["cnn"]), load_model(runs["cnn"] / "model.pt")),
        (load_tagger(runs["finetune"]), load_finetuned(runs["finetune"] / "model.pt")),
    ):
        seg, mean = m.predict_proba_file(path)
        p, track = t.predict_file(path)
        np.testing.assert_allclose(seg, p, atol=1e-7)
        np.testing.assert_allclose(mean, track, atol=1e-7)


def test_torch_modules_equal_predict_segments(runs):
    x = 0.1 * np.random.default_rng(1).standard_normal((2, 5 * 44100)).astype(np.float32)
    for kind in ("cnn", "finetune"):
        t = load_tagger(runs[kind])
        x = (
            x[:, : t.window_samples]
            if kind == "cnn"
            else 0.1 * np.random.default_rng(1).standard_normal((2, t.window_samples)).astype(np.float32)
        )
        with torch.no_grad():
            m = t.torch_module()(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(m, t.predict_segments(x), atol=1e-5)


def test_refusals_are_one_line(runs, tmp_path, tracks):
    with pytest.raises(ModelLoadingError, match="no such run directory"):
        load_tagger(tmp_path / "nope")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "run.json").write_text("{}")
    with pytest.raises(ModelLoadingError, match="has not finished"):
        load_tagger(unfinished)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadingError, match="not a run directory"):
        load_tagger(tmp_path / "empty")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelLoadingError, match="not a readable embedkit model file"):
        load_tagger(junk)
    # a head fitted on embeddings of other tiny-test weights than the installed ones
    from test_fit import tracks_table, write_store

    from embedkit.fit import fit_head

    write_store(tmp_path / "c2", tracks_table(), weights_id="other-weights", dim=32)
    run = fit_head("tiny-test", "lr", cache=tmp_path / "c2", runs=tmp_path / "r2").run_dir
    with pytest.raises(ConfigMismatchError, match="weights other-weights; the weights loaded here are"):
        load_tagger(run)
    # a CNN file whose normalisation does not fit its features
    d = torch.load(runs["cnn"] / "model.pt", weights_only=True)
    d["normalizer"]["mean"] = d["normalizer"]["mean"][:5]
    torch.save(d, tmp_path / "badnorm.pt")
    with pytest.raises(ModelLoadingError, match="normalisation statistics do not have 128 mel bands"):
        load_tagger(tmp_path / "badnorm.pt")


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_numpy_head_form_starts_without_sklearn(runs, tmp_path, monkeypatch):
    from embedkit.deploy import headcache

    monkeypatch.setenv("EMBEDKIT_TAGGER_CACHE", str(tmp_path / "tc"))
    for run in (runs["head"], runs["mlp"]):
        first = load_tagger(run)  # builds and verifies the form from the bundle
        mid = first.model_id
        assert (tmp_path / "tc" / f"{mid}.npz").is_file() and first._bundle is not None
        again = load_tagger(run)
        assert isinstance(again.predictor, headcache.FastHead) and again._bundle is None
        X = np.random.default_rng(0).standard_normal((20, 32)).astype(np.float32)
        np.testing.assert_allclose(again.predictor.predict_proba(X), first.bundle.predict_proba(X), atol=1e-6)
        assert again.bundle.head == first.bundle.head  # the real bundle still loads on demand
    code = f"import sys; from embedkit.deploy.tagger import load_tagger; t = load_tagger({str(runs['head'])!r}); print(sorted(m for m in ('sklearn', 'skops', 'librosa', 'scipy.signal') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**__import__("os").environ, "EMBEDKIT_TAGGER_CACHE": str(tmp_path / "tc")},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    # a corrupt cache entry is ignored (never trusted) and rewritten from the bundle
    mid = model_id_of(runs["head"])
    (tmp_path / "tc" / f"{mid}.npz").write_bytes(b"garbage")
    assert headcache.load(mid) is None
    t = load_tagger(runs["head"])
    assert t._bundle is not None and t.predictor is t._bundle
    assert isinstance(headcache.load(mid), headcache.FastHead)


@pytest.mark.parametrize(
    "args",
    [
        (16000, 512, 96, 0.0, None, False, "slaney"),
        (44100, 2048, 128, 0.0, None, False, "slaney"),
        (16000, 512, 32, 0.0, None, False, "slaney"),
        (22050, 1024, 64, 50.0, 8000.0, True, None),
        (32000, 1024, 64, 50.0, 14000.0, False, "slaney"),
    ],
)
def test_numpy_mel_filters_equal_librosa(args):
    import librosa

    from embedkit.audio.melspec import mel_filters

    sr, n_fft, n_mels, fmin, fmax, htk, norm = args
    ref = librosa.filters.mel(
        sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk, norm=norm, dtype=np.float32
    )
    np.testing.assert_array_equal(mel_filters(sr, n_fft, n_mels, fmin, fmax, htk=htk, norm=norm), ref)


def _save_finetune(tmp_path, bb, name: str, module=None):
    from embedkit.backbones.architecture import describe
    from embedkit.cnn.finetuned import build_finetune_net
    from embedkit.cnn.model import save_model

    module = module if module is not None else bb.torch_module()
    net = build_finetune_net(module, bb.spec.embedding_dim, 3, 0.2).eval()
    spec = bb.spec.to_dict()
    payload = {
        "kind": "finetune",
        "backbone": bb.spec.name,
        "weights_id": bb.weights_id,
        "spec": spec,
        "architecture": describe(spec, module),
        "finetune": {"head_dropout": 0.2},
        "state_dict": net.state_dict(),
        "labels": ["a", "b", "c"],
        "audio": {},
        "segment_s": 5.0,
    }
    save_model(tmp_path / name, payload)
    return net


def test_finetuned_ast_file_loads_without_the_original_model(tmp_path):
    pytest.importorskip("transformers")
    import shutil

    from embedkit.backbones import load_backbone
    from embedkit.backbones.ast import write_random_model

    write_random_model(tmp_path / "ast", seed=3)
    bb = load_backbone("ast-5s", checkpoint=str(tmp_path / "ast"))
    net = _save_finetune(tmp_path, bb, "ft.pt")
    shutil.rmtree(tmp_path / "ast")  # the original model directory is gone
    t = load_tagger(tmp_path / "ft.pt")
    x = 0.1 * torch.randn(2, t.window_samples, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.softmax(net(x), dim=1).double().numpy()
    np.testing.assert_allclose(t.predict_segments(x.numpy()), ref, atol=1e-6)
    assert t.kind == "finetune" and t.sample_rate == 16000


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_finetuned_panns_file_loads_without_the_checkpoint(tmp_path):
    from embedkit.backbones import get_spec
    from embedkit.backbones.panns import build_module

    class FakeBB:  # a PANNs backbone as load() would return it, without a checkpoint file
        spec = get_spec("panns-cnn10")
        weights_id = "random-seed-0"

    net = _save_finetune(tmp_path, FakeBB, "ft.pt", module=build_module("cnn10", seed=0))
    t = load_tagger(tmp_path / "ft.pt")
    x = 0.1 * torch.randn(2, t.window_samples, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.softmax(net(x), dim=1).double().numpy()
    np.testing.assert_allclose(t.predict_segments(x.numpy()), ref, atol=1e-6)
    rec = torch.load(tmp_path / "ft.pt", weights_only=True)["architecture"]
    assert rec == {"format": 1, "family": "panns", "arch": "cnn10"}
    json.dumps(rec)  # plain JSON: readable with weights_only=True


@needs_shared
@pytest.mark.slow
def test_cnn_tagger_on_real_music_stays_close_to_the_held_out_predictions(tmp_path):
    """gtzan_mini, a small CNN (8 epochs): per-window inference vs the run's evaluation."""
    from embedkit.cnn.train import TrainConfig, train_cnn
    from embedkit.datasets import load_dataset

    tracks = load_dataset(GTZAN)
    run = train_cnn(
        tracks,
        cv=None,
        train=TrainConfig(epochs=8, batch_size=16, patience=8, crops_per_clip=2),
        channels=(8, 16, 32, 32),
        runs_dir=tmp_path / "runs",
        cache=tmp_path / "cache",
        threads=2,
        workers=2,
    ).run_dir
    t = load_tagger(run)
    ref = _heldout(run, tracks)
    got = {p: t.predict_file(p)[1] for p in ref}
    worst = max(float(np.abs(got[p] - ref[p]).max()) for p in ref)
    same = sum(int(got[p].argmax() == ref[p].argmax()) for p in ref)
    assert len(ref) == 20 and worst < 0.03 and same >= 16, (worst, same)
