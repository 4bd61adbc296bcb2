"""musicnn-msd / musicnn-mtt: checkpoint reader, golden parity with the TensorFlow graph, the
Backbone contract and the torch module. Needs the musicnn checkpoints (`bash scripts/install.sh`
unpacks them; an installed musicnn package also counts). Parity on the synthetic chord signal runs everywhere (its golden outputs are
in tests/data, the signal is regenerated from its formula); on real clips it needs
../shared/golden/musicnn."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest

from embedkit.backbones.musicnn import checkpoints_available
from embedkit.backbones.tfcheckpoint import TFCheckpoint, crc32c, unmask_crc
from embedkit.errors import ModelLoadingError

from conftest import DATA, GOLDEN, needs_shared

HAS_MUSICNN = checkpoints_available("musicnn-msd") and checkpoints_available("musicnn-mtt")
needs_musicnn = pytest.mark.skipif(not HAS_MUSICNN, reason="musicnn checkpoints not found: bash scripts/install.sh")
# Real clips from ../shared; the chord signal's cases come from tests/data (chord_golden).
GOLDEN_FILES = (
    sorted(p for p in (GOLDEN / "musicnn").glob("*_musicnn.npz") if not p.name.startswith("chord_"))
    if GOLDEN.exists()
    else []
)
needs_golden = pytest.mark.skipif(not GOLDEN_FILES, reason=f"golden files not found under {GOLDEN / 'musicnn'}")


def chord_signal() -> np.ndarray:
    """The synthetic chord of ../shared/README.md: 30 s at 16 kHz, float32."""
    t = np.arange(30 * 16000) / 16000
    y = sum(0.1 * np.sin(2 * np.pi * f * k * t) / k for f in (261.63, 329.63, 392.0) for k in (1, 2, 3))
    y *= 0.5 * (1 + np.sin(2 * np.pi * 0.5 * t)) ** 2 / 4 + 0.2
    return y.astype(np.float32)


def librosa_logmel(y: np.ndarray) -> np.ndarray:
    """The golden files' log-mel: log10(10000 S + 1), librosa Slaney mel, time-major [T, 96]."""
    import librosa

    S = librosa.feature.melspectrogram(y=y, sr=16000, n_fft=512, hop_length=256, n_mels=96)
    return np.log10(10000 * S + 1).T.astype(np.float32)


def chord_golden(model: str) -> dict[str, np.ndarray]:
    """The chord golden record of ``model`` ("MSD" | "MTT"), audio and log-mel regenerated."""
    z = np.load(DATA / "musicnn_chord_golden.npz")
    g = {k.split("_", 1)[1]: z[k] for k in z.files if k.startswith(f"{model}_")}
    g["audio_16k"] = chord_signal()
    g["logmel"] = librosa_logmel(g["audio_16k"])
    return g


def _slow_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------
# checkpoint reader


def test_crc32c_matches_reference():
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 check value
    assert crc32c(b"") == 0
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 15, 16, 17, 20, 64, 255, 1000, 4097):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert crc32c(data) == _slow_crc32c(data), n


def test_unmask_crc_inverts_leveldb_mask():
    crc = 0x12345678
    masked = ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF
    assert unmask_crc(masked) == crc


def _bundle(name: str):
    from embedkit.backbones.musicnn import package_dir

    return package_dir() / name


@needs_musicnn
def test_reads_bundle_entries_and_verifies_every_tensor():
    ckpt = TFCheckpoint(str(_bundle("MSD_musicnn")) + "/")
    assert ckpt.num_shards == 1
    e = ckpt.entries["conv2d/kernel"]
    assert (e.dtype, e.shape) == ("<f4", (7, 38, 1, 204))
    arrays = {k: ckpt.read(k) for k in ckpt.keys()}  # every tensor passes its CRC32C
    model = {k: v for k, v in arrays.items() if "/Adam" not in k and not k.endswith("_power")}
    n_params = sum(v.size for v in model.values())
    assert 780_000 < n_params < 800_000  # shared/README: ~0.79 M model parameters
    assert sum(v.nbytes for v in arrays.values()) == (_bundle("MSD_musicnn") / ".data-00000-of-00001").stat().st_size


@needs_musicnn
def test_corrupt_and_truncated_bundles_are_refused(tmp_path):
    src = _bundle("MSD_musicnn")
    dst = tmp_path / "ckpt"
    dst.mkdir()
    for f in (".index", ".data-00000-of-00001"):
        shutil.copy(src / f, dst / f)
    e = TFCheckpoint(str(dst) + "/").entries["dense/kernel"]
    data = bytearray((dst / ".data-00000-of-00001").read_bytes())
    data[e.offset + 10] ^= 0xFF
    (dst / ".data-00000-of-00001").write_bytes(bytes(data))
    with pytest.raises(ModelLoadingError, match="CRC32C mismatch for tensor 'dense/kernel'"):
        TFCheckpoint(str(dst) + "/").read("dense/kernel")
    (dst / ".data-00000-of-00001").write_bytes(bytes(data[: e.offset]))
    with pytest.raises(ModelLoadingError, match="truncated"):
        TFCheckpoint(str(dst) + "/").read("dense/kernel")
    index = bytearray((dst / ".index").read_bytes())
    (dst / ".index").write_bytes(bytes(index[:-10]))
    with pytest.raises(ModelLoadingError, match="not a readable TensorFlow checkpoint index"):
        TFCheckpoint(str(dst) + "/")
    index[len(index) // 3] ^= 0x55  # a flipped byte inside a block: block CRC catches it
    (dst / ".index").write_bytes(bytes(index))
    with pytest.raises(ModelLoadingError, match="CRC32C mismatch in block"):
        TFCheckpoint(str(dst) + "/")
    with pytest.raises(ModelLoadingError, match="cannot read checkpoint index"):
        TFCheckpoint(str(tmp_path / "nothing") + "/")


def test_missing_checkpoints_name_the_install_command(monkeypatch, tmp_path):
    import sys

    from embedkit.backbones import load_backbone

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "musicnn" else real(name, *a))
    monkeypatch.setattr(sys, "prefix", str(tmp_path))  # no checkpoints in the environment...
    monkeypatch.delenv("EMBEDKIT_MUSICNN_DIR", raising=False)  # ...nor elsewhere (HOME is isolated)
    with pytest.raises(ModelLoadingError, match=r"bash scripts/install\.sh.*install-musicnn"):
        load_backbone("musicnn-msd")


def test_specs_registered():
    from embedkit.backbones import get_spec

    for name in ("musicnn-msd", "musicnn-mtt"):
        s = get_spec(name)
        assert (s.sample_rate, s.embedding_dim, s.segment_s, s.license, s.outputs) == (
            16000,
            200,
            5.0,
            "ISC",
            ("taggram",),
        )
        assert s.frontend["n_fft"] == 512 and s.frontend["hop_length"] == 256 and s.frontend["n_mels"] == 96
        assert "python -m embedkit.weights install-musicnn" in s.requires


# ---------------------------------------------------------------------------------------------
# loaded models (once per session)


@pytest.fixture(scope="module")
def models():
    if not HAS_MUSICNN:
        pytest.skip("musicnn checkpoints not found: bash scripts/install.sh")
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    from embedkit.backbones import load_backbone

    return {"MSD": load_backbone("musicnn-msd"), "MTT": load_backbone("musicnn-mtt")}


@needs_musicnn
def test_weights_id_is_sha256_of_the_data_file(models):
    import hashlib

    for key, bb in models.items():
        sha = hashlib.sha256((_bundle(f"{key}_musicnn") / ".data-00000-of-00001").read_bytes()).hexdigest()
        assert bb.spec.weights_sha256 == sha
        assert bb.weights_id == sha[:12]


@pytest.mark.slow
@needs_shared
@needs_golden
@pytest.mark.parametrize("path", GOLDEN_FILES, ids=lambda p: p.stem)
def test_parity_with_tensorflow_golden(models, path):
    """Golden log-mel patches (3 s = 187 and 5 s = 312 frames) through both inference paths."""
    check_parity(np.load(path), models["MSD" if "_MSD_" in path.name else "MTT"])


@needs_musicnn
@pytest.mark.parametrize("model", ["MSD", "MTT"])
@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_parity_with_tensorflow_golden_chord(models, model):
    """The same parity on the chord signal, from tests/data (runs without ../shared)."""
    check_parity(chord_golden(model), models[model])


def check_parity(g, bb) -> None:
    import torch

    net = bb.torch_module()
    assert bb.output_labels("taggram") == [str(x) for x in g["labels"]]
    lm = torch.from_numpy(g["logmel"])
    errs = {}
    for frames, n, tag in ((187, 10, "3s"), (312, 6, "5s")):
        x = lm[: frames * n].reshape(n, frames, 96)
        for pruned in (True, False) if tag == "3s" else (True,):  # full network: once is enough
            net.use_pruned_plan = pruned
            try:
                with torch.inference_mode():
                    out = {k: v.numpy() for k, v in net.forward_logmel(x).items()}
            finally:
                net.use_pruned_plan = True
            errs[tag, pruned] = (
                np.abs(out["taggram"] - g[f"taggram_{tag}"]).max(),
                np.abs(out["penultimate"] - g[f"penultimate_{tag}"]).max(),
            )
            np.testing.assert_allclose(out["taggram"], g[f"taggram_{tag}"], atol=1e-4, rtol=0)
            np.testing.assert_allclose(out["penultimate"], g[f"penultimate_{tag}"], atol=1e-3, rtol=0)
            if tag == "3s":
                np.testing.assert_allclose(out["mean_pool"], g["mean_pool_3s"], atol=1e-3, rtol=1e-5)
                np.testing.assert_allclose(out["max_pool"], g["max_pool_3s"], atol=1e-3, rtol=1e-5)
    # A faithful port lands far inside the tolerances (measured ~5e-6 / ~1.5e-5); a subtle
    # mistake (padding side, BN epsilon, pooled-feature order) lands at 1e-3 or worse.
    assert max(e[0] for e in errs.values()) < 2e-5
    assert max(e[1] for e in errs.values()) < 1e-4


@needs_shared
@needs_golden
@pytest.mark.parametrize("signal", sorted({p.name.split("_")[0] for p in GOLDEN_FILES}))
def test_torch_logmel_matches_librosa_golden(models, signal):
    check_logmel(np.load(GOLDEN / "musicnn" / f"{signal}_MSD_musicnn.npz"), models)


@needs_musicnn
@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_torch_logmel_matches_librosa_chord(models):
    check_logmel(chord_golden("MSD"), models)


def check_logmel(g, models) -> None:
    import torch

    with torch.inference_mode():
        lm = models["MSD"].torch_module().logmel(torch.from_numpy(g["audio_16k"])[None])[0].numpy()
    assert lm.shape == g["logmel"].shape
    np.testing.assert_allclose(lm, g["logmel"], atol=1e-4, rtol=0)  # measured max ~5e-6


@needs_shared
@needs_golden
def test_embed_of_golden_audio_matches_per_patch_outputs(models):
    """Backbone.embed/outputs on raw 16 kHz audio: one output per segment, not the first
    patch's repeated (musicnn extractor defect), and no float16 overflow on loud music."""
    g = np.load(GOLDEN / "musicnn" / "metal00000_MSD_musicnn.npz")
    seg = g["audio_16k"][: 6 * 80000].reshape(6, 80000)
    out = models["MSD"].outputs(seg)
    assert out["embedding"].shape == (6, 200) and out["taggram"].shape == (6, 50)
    assert np.isfinite(out["embedding"]).all()
    assert np.abs(np.diff(out["embedding"], axis=0)).max() > 1e-2  # segments differ
    # Segment k starts at sample 80000k, golden patch k at frame 312k (sample 79872k), and each
    # segment has its own STFT edge padding: only segment 0 is aligned, the rest are shifted by
    # up to 2.5 frames: only segment 0 can match closely.
    np.testing.assert_allclose(out["taggram"][0], g["taggram_5s"][0], atol=0.02)
    np.testing.assert_allclose(out["embedding"][0], g["penultimate_5s"][0], atol=0.1)


# ---------------------------------------------------------------------------------------------
# Backbone contract


@needs_musicnn
@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_contract_shapes_determinism_batching(models):
    rng = np.random.default_rng(0)
    y = (0.1 * rng.standard_normal((3, 80000))).astype(np.float32)
    for bb in models.values():
        out = bb.outputs(y)
        assert out["embedding"].shape == (3, 200) and out["embedding"].dtype == np.float32
        assert out["taggram"].shape == (3, 50) and ((out["taggram"] >= 0) & (out["taggram"] <= 1)).all()
        np.testing.assert_array_equal(bb.embed(y), out["embedding"])  # deterministic
        one = np.concatenate([bb.embed(y[i : i + 1]) for i in range(3)])
        np.testing.assert_allclose(one, out["embedding"], atol=1e-5, rtol=0)
        assert bb.embed(np.zeros((0, 80000), np.float32)).shape == (0, 200)
        labels = bb.output_labels("taggram")
        assert len(labels) == 50 and all(isinstance(x, str) for x in labels)
        with pytest.raises(KeyError):
            bb.output_labels("nope")
        with pytest.raises(ValueError):
            bb.embed(np.zeros(80000, np.float32))


@needs_musicnn
def test_no_nan_on_silence_quiet_loud_and_odd_lengths(models):
    rng = np.random.default_rng(1)
    cases = {
        "silence": np.zeros((1, 80000), np.float32),
        "quiet": (1e-6 * rng.standard_normal((1, 80000))).astype(np.float32),
        "loud": np.sign(rng.standard_normal((1, 80000))).astype(np.float32) * 20.0,
        "absurdly-loud": np.sign(rng.standard_normal((1, 80000))).astype(np.float32) * 1e4,  # > PRUNE_X_MAX: full net
        "short": (0.1 * rng.standard_normal((1, 300))).astype(np.float32),
        "3s": (0.1 * rng.standard_normal((1, 48000))).astype(np.float32),
    }
    for bb in models.values():
        for name, y in cases.items():
            out = bb.outputs(y)
            assert np.isfinite(out["embedding"]).all() and np.isfinite(out["taggram"]).all(), name


@needs_musicnn
@pytest.mark.slow  # over half a second: the fast tier keeps about a minute
def test_pruned_plan_equals_full_network_and_guard_falls_back(models):
    import torch

    from embedkit.backbones.musicnn import PRUNE_X_MAX

    rng = np.random.default_rng(2)
    for bb in models.values():
        net = bb.torch_module()
        for scale in (1.0, 30.0):  # 30: normalised input far beyond PRUNE_X_MAX -> full network
            x = torch.from_numpy((scale * rng.uniform(0, 6, (2, 200, 96))).astype(np.float32))
            with torch.inference_mode():
                assert (float(net.in_bn(x).abs().amax()) > PRUNE_X_MAX) == (scale > 1)
                fast = net.forward_logmel(x)
                net.use_pruned_plan = False
                full = net.forward_logmel(x)
                net.use_pruned_plan = True
            for k in ("penultimate", "taggram"):
                np.testing.assert_allclose(fast[k].numpy(), full[k].numpy(), atol=2e-5 * scale, rtol=1e-5)
        plan = net.plan()
        n_live = sum(br["w"].shape[0] for br in plan["branches"])
        assert 0 < n_live < sum(w.shape[0] for w in net.front_w)  # something was pruned


@pytest.mark.slow
@needs_musicnn
def test_torch_module_fine_tuning_semantics(models):
    """torch_module(): waveform -> 200-d, taggram head exposed, BN keeps inference statistics in
    train mode, gradients reach the front end, and the pruned plan follows weight updates."""
    import copy

    import torch

    bb = models["MSD"]
    net = copy.deepcopy(bb.torch_module())
    rng = np.random.default_rng(3)
    y = torch.from_numpy((0.1 * rng.standard_normal((2, 32000))).astype(np.float32))
    with torch.inference_mode():
        emb_eval, tags_eval = net.forward_with_taggram(y)
    np.testing.assert_allclose(emb_eval.numpy(), bb.embed(y.numpy()), atol=1e-6)
    assert tags_eval.shape == (2, 50) and net.tag_head.out_features == 50 and len(net.labels) == 50
    with torch.inference_mode():
        np.testing.assert_allclose(torch.sigmoid(net.tag_head(emb_eval)).numpy(), tags_eval.numpy(), atol=1e-6)

    net.train()
    emb_train = net(y)
    np.testing.assert_allclose(emb_train.detach().numpy(), emb_eval.numpy(), atol=1e-4)  # no batch stats
    emb_train.pow(2).mean().backward()
    assert net.front_w[0].grad is not None and net.front_w[0].grad.abs().sum() > 0
    assert net.front_bn[0].gamma.grad is not None and not net.front_bn[0].center.requires_grad
    key_before = net._weights_key()
    torch.optim.SGD(net.parameters(), lr=1.0).step()  # big in-place step
    assert net._weights_key() != key_before
    net.eval()
    with torch.inference_mode():
        fast = net(y)
        net.use_pruned_plan = False
        full = net(y)
    np.testing.assert_allclose(fast.numpy(), full.numpy(), atol=1e-4)  # plan rebuilt from new weights
    assert (fast - emb_eval).abs().max() > 1e-3


@needs_musicnn
def test_extract_engine_writes_embeddings_and_taggram(models, tmp_path, synth_dataset):
    from embedkit.datasets import load_dataset
    from embedkit.extract import extract

    tracks = load_dataset(synth_dataset).head(3)
    res = extract(tracks, models["MSD"], cache=tmp_path, outputs=("taggram",), workers=1)
    meta, X = res.store.read()
    _, T = res.store.read("taggram")
    # 12 s clips are looped to the 30 s clip length: 6 segments of 5 s each
    assert X.shape == (len(meta), 200) and T.shape == (len(meta), 50) and len(meta) == 3 * 6
    assert np.isfinite(X).all()


@needs_musicnn
def test_the_packaged_bundle_skips_the_crc_pass_only_when_both_files_are_the_published_bytes(tmp_path, monkeypatch):
    from embedkit.backbones import load_backbone, musicnn, tfcheckpoint

    src = _bundle("MSD_musicnn")
    verified, unverified = musicnn.read_weights(str(src) + "/"), musicnn.read_weights(str(src) + "/", verify=False)
    assert verified.keys() == unverified.keys() and all(np.array_equal(verified[k], unverified[k]) for k in verified)
    calls = []
    real = tfcheckpoint.crc32c
    monkeypatch.setattr(tfcheckpoint, "crc32c", lambda b: calls.append(len(b)) or real(b))
    load_backbone("musicnn-msd")
    assert len(calls) <= 2  # the index's own blocks only (its block CRCs stay); no tensor pass
    # a user checkpoint (same bytes, other place) is CRC-checked, and a flipped byte is refused
    dst = tmp_path / "ckpt"
    dst.mkdir()
    for f in (".index", ".data-00000-of-00001"):
        shutil.copy(src / f, dst / f)
    calls.clear()
    load_backbone("musicnn-msd", checkpoint=str(dst))
    assert len(calls) > 30  # every tensor
    e = TFCheckpoint(str(dst) + "/").entries["dense/kernel"]
    data = bytearray((dst / ".data-00000-of-00001").read_bytes())
    data[e.offset + 10] ^= 0xFF
    (dst / ".data-00000-of-00001").write_bytes(bytes(data))
    with pytest.raises(ModelLoadingError, match="CRC32C mismatch for tensor 'dense/kernel'"):
        load_backbone("musicnn-msd", checkpoint=str(dst))
