"""PANNs backbones: parity with the reference implementation, the official checkpoint format,
checkpoint resolution/verification, and the CLI end to end with random weights."""

import hashlib
import importlib.util
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from embedkit.backbones import load_backbone, panns
from embedkit.errors import ModelLoadingError

from conftest import SHARED


def official_extras() -> dict:
    """What the official checkpoints store beside the weights: the training iteration and the
    sampler state (NumPy arrays and ints), here plus a NumPy scalar."""
    rng = np.random.RandomState(0)
    return {
        "iteration": 660000,
        "sampler": {
            "indexes_per_class": [rng.permutation(7) for _ in range(3)],
            "queue": [2, 0, 1],
            "pointers_of_classes": [0, 3, 1],
        },
        "test_mAP": np.float64(0.431),
    }


@pytest.fixture(scope="session")
def cnn14_ckpt(panns_checkpoint):
    return panns_checkpoint("cnn14")


@pytest.fixture(scope="session")
def cnn10_ckpt(panns_checkpoint):
    return panns_checkpoint("cnn10")


@pytest.fixture(scope="module")
def cnn14(cnn14_ckpt):
    return load_backbone("panns-cnn14", checkpoint=str(cnn14_ckpt))


def load_reference_models(monkeypatch, tmp_path):
    """panns_inference/models.py loaded from its file, without running the package __init__
    (which downloads a label file into ~/panns_data at import time)."""
    spec = importlib.util.find_spec("panns_inference")
    if spec is None or importlib.util.find_spec("torchlibrosa") is None:
        pytest.skip("reference needs `pip install panns_inference torchlibrosa` (test extra)")
    folder = Path(spec.submodule_search_locations[0])
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))  # models.py imports pyplot
    monkeypatch.setenv("MPLBACKEND", "Agg")
    pkg = types.ModuleType("_panns_reference")
    pkg.__path__ = [str(folder)]  # lets `from .pytorch_utils import ...` resolve inside the folder
    monkeypatch.setitem(sys.modules, "_panns_reference", pkg)
    mspec = importlib.util.spec_from_file_location("_panns_reference.models", folder / "models.py")
    mod = importlib.util.module_from_spec(mspec)
    monkeypatch.setitem(sys.modules, "_panns_reference.models", mod)
    mspec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_parity_with_panns_inference_cnn14(cnn14_ckpt, cnn14, clean_home, monkeypatch, tmp_path):
    ref_models = load_reference_models(monkeypatch, tmp_path)
    ref = ref_models.Cnn14(
        sample_rate=32000, window_size=1024, hop_size=320, mel_bins=64, fmin=50, fmax=14000, classes_num=527
    )
    ref.load_state_dict(torch.load(cnn14_ckpt, weights_only=False)["model"])  # our own test file
    ref.eval()
    bb = cnn14
    rng = np.random.default_rng(1)
    x = (0.2 * rng.standard_normal((2, 32000 * 4))).astype(np.float32)
    x[1] *= np.linspace(0, 1, x.shape[1], dtype=np.float32)  # non-stationary
    with torch.inference_mode():
        r = ref(torch.from_numpy(x))
    out = bb.outputs(x)
    for ours, theirs in ((out["embedding"], r["embedding"]), (out["clipwise"], r["clipwise_output"])):
        theirs = theirs.numpy()
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        assert np.abs(theirs).max() > 0.05  # the comparison is not between two zero vectors
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * max(1.0, float(np.abs(theirs).max())))
    assert "panns_inference" not in sys.modules  # the package __init__ never ran...
    assert list(clean_home.iterdir()) == []  # ...and nothing was written to HOME


@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_frontend_matches_torchlibrosa():
    stft = pytest.importorskip("torchlibrosa.stft")
    spec = stft.Spectrogram(
        n_fft=1024,
        hop_length=320,
        win_length=1024,
        window="hann",
        center=True,
        pad_mode="reflect",
        freeze_parameters=True,
    )
    mel = stft.LogmelFilterBank(
        sr=32000, n_fft=1024, n_mels=64, fmin=50, fmax=14000, ref=1.0, amin=1e-10, top_db=None, freeze_parameters=True
    )
    ours = panns.canonical_frontend()
    np.testing.assert_allclose(
        ours["spectrogram_extractor.stft.conv_real.weight"], spec.stft.conv_real.weight.numpy(), atol=1e-6
    )
    np.testing.assert_allclose(
        ours["spectrogram_extractor.stft.conv_imag.weight"], spec.stft.conv_imag.weight.numpy(), atol=1e-6
    )
    np.testing.assert_array_equal(ours["logmel_extractor.melW"], mel.melW.numpy())
    # and the computation: same kernels -> identical log-mel
    net = panns.build_module("cnn10", seed=0)
    y = torch.from_numpy((0.1 * np.random.default_rng(0).standard_normal((2, 40000))).astype(np.float32))
    with torch.inference_mode():
        net.spectrogram_extractor.stft.conv_real.weight.copy_(spec.stft.conv_real.weight)
        net.spectrogram_extractor.stft.conv_imag.weight.copy_(spec.stft.conv_imag.weight)
        np.testing.assert_allclose(
            net.logmel_extractor(net.spectrogram_extractor(y)).numpy(), mel(spec(y)).numpy(), atol=1e-5
        )


def _rewrite_pickle_as_numpy1(src: Path, dst: Path) -> None:
    """Rename numpy._core -> numpy.core inside a zip checkpoint: the module names a checkpoint
    written under NumPy 1.x (like the official ones) carries."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(name, data)


@pytest.mark.parametrize("variant", ["zip", "zip-numpy1", "legacy", "bare-state-dict"])
def test_official_format_round_trips(variant, tmp_path, clean_home):
    net = panns.build_module("cnn10", seed=3)
    sd = net.state_dict()
    p = tmp_path / "ckpt.pth"
    if variant == "bare-state-dict":
        torch.save(sd, p)
    elif variant == "legacy":
        torch.save({**official_extras(), "model": sd}, p, _use_new_zipfile_serialization=False)
    else:
        torch.save({**official_extras(), "model": sd}, p)
        if variant == "zip-numpy1":
            _rewrite_pickle_as_numpy1(p, tmp_path / "np1.pth")
            p = tmp_path / "np1.pth"
    if variant != "bare-state-dict":  # NumPy content really is there: plain weights_only refuses it
        with pytest.raises(Exception, match="(?i)weights only load failed"):
            torch.load(p, weights_only=True)
    bb = load_backbone("panns-cnn10", checkpoint=str(p))
    assert bb.weights_id == hashlib.sha256(p.read_bytes()).hexdigest()[:12]
    assert bb.official_weights is False
    loaded = bb.torch_module().state_dict()
    assert set(loaded) == set(sd)
    for k, v in sd.items():
        assert not loaded[k].is_meta
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)


def test_refuses_pickled_code(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"model": panns.build_module("cnn10").state_dict(), "cfg": types.SimpleNamespace(a=1)}, p)
    with pytest.raises(ModelLoadingError, match="will not execute pickled code"):
        load_backbone("panns-cnn10", checkpoint=str(p))


def test_resolution_order_and_missing_message(cnn10_ckpt, clean_home, monkeypatch):
    with pytest.raises(ModelLoadingError) as e:
        load_backbone("panns-cnn10")
    msg = str(e.value)
    assert "\n" not in msg
    for part in (
        str(clean_home / "panns_data" / "Cnn10_mAP=0.380.pth"),
        "zenodo.org/record/3987831",
        "--checkpoint",
        "EMBEDKIT_PANNS_CNN10",
    ):
        assert part in msg
    monkeypatch.setenv("EMBEDKIT_PANNS_CNN10", str(cnn10_ckpt))
    assert load_backbone("panns-cnn10").path == cnn10_ckpt
    with pytest.raises(ModelLoadingError, match="not found"):  # explicit path wins over the env var
        load_backbone("panns-cnn10", checkpoint=str(clean_home / "nope.pth"))
    monkeypatch.setenv("EMBEDKIT_PANNS_CNN10", str(clean_home / "gone.pth"))
    with pytest.raises(ModelLoadingError, match=r"\$EMBEDKIT_PANNS_CNN10"):
        load_backbone("panns-cnn10")


def test_published_file_is_verified(cnn10_ckpt, clean_home):
    folder = clean_home / "panns_data"
    folder.mkdir()
    official = folder / "Cnn10_mAP=0.380.pth"
    official.write_bytes(cnn10_ckpt.read_bytes())  # right name, wrong size: a broken download
    with pytest.raises(ModelLoadingError, match="25237595 bytes.*incomplete or corrupt"):
        load_backbone("panns-cnn10")
    with open(official, "wb") as f:  # right size, wrong content
        f.truncate(panns.ARCHS["cnn10"].published.size)
    with pytest.raises(ModelLoadingError, match="checksum mismatch"):
        load_backbone("panns-cnn10")
    # the checksum check itself accepts a file whose size and MD5 match
    from embedkit.weights import PublishedFile, verify_file

    good = clean_home / "tiny.bin"
    good.write_bytes(b"abc")
    pub = PublishedFile("x", "tiny.bin", "X", str(clean_home), "url", size=3, md5=hashlib.md5(b"abc").hexdigest())
    assert verify_file(good, pub).official


@pytest.mark.parametrize("kind", ["empty", "html", "truncated", "directory", "not-a-dict"])
def test_corrupt_checkpoints_give_one_line(kind, cnn10_ckpt, tmp_path):
    p = tmp_path / "bad.pth"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "html":
        p.write_text("<html><body>Too many requests</body></html>")
    elif kind == "truncated":
        p.write_bytes(cnn10_ckpt.read_bytes()[:5_000_000])
    elif kind == "directory":
        p.mkdir()
    else:
        torch.save([1, 2, 3], p)
    with pytest.raises(ModelLoadingError) as e:
        load_backbone("panns-cnn10", checkpoint=str(p))
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_wrong_architecture(cnn10_ckpt, tmp_path):
    with pytest.raises(ModelLoadingError, match="not a panns-cnn14 checkpoint.*use --backbone panns-cnn10"):
        load_backbone("panns-cnn14", checkpoint=str(cnn10_ckpt))
    other = tmp_path / "other.pth"
    torch.save({"model": torch.nn.Linear(3, 2).state_dict()}, other)
    with pytest.raises(ModelLoadingError, match="not a panns-cnn10 checkpoint"):
        load_backbone("panns-cnn10", checkpoint=str(other))
    sd = panns.build_module("cnn10", seed=0).state_dict()
    sd["logmel_extractor.melW"] = sd["logmel_extractor.melW"] * 2  # e.g. another sample rate
    torch.save({"model": sd}, other)
    with pytest.raises(ModelLoadingError, match="front end logmel_extractor.melW differs"):
        load_backbone("panns-cnn10", checkpoint=str(other))


def test_outputs_and_labels(cnn10_ckpt):
    bb = load_backbone("panns-cnn10", checkpoint=str(cnn10_ckpt))
    x = (0.1 * np.random.default_rng(0).standard_normal((2, 32000))).astype(np.float32)
    out = bb.outputs(x)
    assert out["embedding"].shape == (2, 512) and out["clipwise"].shape == (2, 527)
    assert ((out["clipwise"] > 0) & (out["clipwise"] < 1)).all()
    np.testing.assert_array_equal(out["embedding"], bb.embed(x))
    labels = bb.output_labels("clipwise")
    assert len(labels) == 527 and labels[0] == "Speech" and labels[137] == "Music"
    with pytest.raises(Exception, match="at least 0.31 s"):
        bb.embed(np.zeros((1, 5000), np.float32))
    assert bb.embed(np.zeros((0, 32000), np.float32)).shape == (0, 512)


@pytest.mark.skipif(not (SHARED / "data" / "audioset" / "class_labels_indices.csv").exists(), reason="../shared absent")
def test_packaged_labels_equal_shared_copy():
    import csv

    with open(SHARED / "data" / "audioset" / "class_labels_indices.csv", newline="") as f:
        assert panns.audioset_labels() == [r["display_name"] for r in csv.DictReader(f)]


@pytest.mark.slow
def test_extract_decodes_each_file_once(cnn10_ckpt, synth_dataset, tmp_path, monkeypatch):
    from embedkit.audio import decoding as audio
    from embedkit.config import AudioConfig, PreprocessConfig, SegmentConfig
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract

    calls = []
    real_decode = audio.decode

    def counting_decode(path, *args, **kwargs):
        calls.append(str(path))
        return real_decode(path, *args, **kwargs)

    monkeypatch.setattr(audio, "decode", counting_decode)
    tracks = load_dataset(synth_dataset).iloc[:4]
    prep = PreprocessConfig(AudioConfig(clip_s=6.0), SegmentConfig(3.0, 3.0))
    res = extract(
        tracks,
        "panns-cnn10",
        cache=tmp_path / "cache",
        checkpoint=str(cnn10_ckpt),
        prep=prep,
        workers=1,
        outputs=("clipwise",),
    )
    assert res.n_extracted == 4 and res.n_segments == 8
    assert sorted(calls) == sorted(tracks.path)


# --------------------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_cli_extract_cnn14_end_to_end(cli, cnn14_ckpt, cnn14, synth_dataset, tmp_path, clean_home):
    from embedkit.store import Store

    cache = tmp_path / "cache"
    r = cli(
        [
            "extract",
            str(synth_dataset),
            "--backbone",
            "panns-cnn14",
            "--checkpoint",
            str(cnn14_ckpt),
            "--cache",
            str(cache),
            "--clip",
            "2",
            "--segment",
            "2",
            "--output",
            "clipwise",
            "--workers",
            "1",
        ]
    )
    assert r.exit_code == 0, r.output
    (store_dir,) = [p for p in (cache / "panns-cnn14").iterdir() if p.is_dir()]
    meta, X = Store(store_dir).read()
    assert X.shape == (20, 2048) and X.dtype == np.float32 and np.isfinite(X).all()
    assert meta.track_id.nunique() == 20
    _, P = Store(store_dir).read("clipwise")
    assert P.shape == (20, 527) and ((P > 0) & (P < 1)).all()
    # stored rows equal a direct call on the canonical decode of the same file
    from embedkit.config import AudioConfig, PreprocessConfig, SegmentConfig
    from embedkit.extract import decode_track

    row = meta.iloc[0]
    frames, _ = decode_track(row.path, 32000, PreprocessConfig(AudioConfig(clip_s=2.0), SegmentConfig(2.0, 2.0)))
    direct = cnn14.embed(frames)
    np.testing.assert_allclose(X[0], direct[0], rtol=1e-5, atol=1e-6)
    assert list(clean_home.iterdir()) == []


@pytest.mark.parametrize("case", ["missing", "corrupt", "wrong-arch", "no-default"])
def test_cli_checkpoint_errors_are_one_line(cli, case, cnn10_ckpt, synth_dataset, tmp_path, clean_home):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 1000)
    ckpt = {
        "missing": ["--checkpoint", str(tmp_path / "nope.pth")],
        "corrupt": ["--checkpoint", str(bad)],
        "wrong-arch": ["--checkpoint", str(cnn10_ckpt)],
        "no-default": [],
    }[case]
    r = cli(["extract", str(synth_dataset), "--backbone", "panns-cnn14", "--cache", str(tmp_path / "c"), *ckpt])
    assert r.exit_code != 0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    assert list(clean_home.iterdir()) == []
