"""PANNs AudioSet CNNs (Kong et al. 2020): `panns-cnn14` (2048-d) and the lighter `panns-cnn10` (512-d).

The networks are re-implemented here (no torchlibrosa / panns_inference at run time) with the
exact module layout of ``audioset_tagging_cnn/pytorch/models.py``, so the official checkpoint
files (``{"model": state_dict, "iteration": ..., ...}``) load as they are, front end included:
``spectrogram_extractor.stft.conv_{real,imag}.weight`` (windowed DFT kernels) and
``logmel_extractor.melW`` (mel filterbank) are buffers read from the checkpoint, and the STFT is
computed as a strided conv1d with those kernels, exactly as torchlibrosa does. (``torch.stft``
is ~4x cheaper for this step but differs by ~2e-6 relative in power, and the conv costs only
~4 % of a Cnn14 forward; exactness with the reference wins.)

Input: mono 32 kHz segments (any length >= 0.31 s; the models were trained on 10 s clips).
Front end: |STFT|^2 (n_fft 1024, hop 320, Hann, centred with reflect padding) -> 64 mel bands
(50-14000 Hz, Slaney) -> 10*log10(max(S, 1e-10)) -> bn0 over mel bands.
Outputs: ``embedding`` = ReLU(fc1) (the PANNs embedding), ``clipwise`` = sigmoid(fc_audioset),
527 AudioSet class probabilities named by ``output_labels("clipwise")``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import BackboneError, ModelLoadingError
from ..weights import PublishedFile, load_torch_checkpoint, resolve_file, verify_file
from .base import Backbone, BackboneSpec
from .registry import register_backbone

SR = 32000
N_FFT = 1024
HOP = 320
N_MELS = 64
FMIN = 50.0
FMAX = 14000.0
N_CLASSES = 527
#: shortest input: 5 pooling stages halve time; 32 frames -> one frame at the end.
MIN_SAMPLES = 31 * HOP

FRONTEND = {
    "n_fft": N_FFT,
    "hop_length": HOP,
    "window": "hann",
    "center": True,
    "pad_mode": "reflect",
    "n_mels": N_MELS,
    "f_min": FMIN,
    "f_max": FMAX,
    "mel": "slaney",
    "log": "10*log10(max(S,1e-10))",
}

ZENODO = "https://zenodo.org/record/3987831/files/"


@dataclass(frozen=True)
class Arch:
    """One PANNs CNN: conv-block widths, pooling per block and the published weights file."""

    key: str
    class_name: str
    channels: tuple[int, ...]
    pools: tuple[int, ...]  # square avg-pool size after each block
    published: PublishedFile

    @property
    def embedding_dim(self) -> int:
        return self.channels[-1]


# Sizes and MD5s are those published by Zenodo for record 3987831 (cross-checked against several
# independent projects that pin the same files); they cannot be checked here without the files.
ARCHS = {
    "cnn14": Arch(
        "cnn14",
        "Cnn14",
        (64, 128, 256, 512, 1024, 2048),
        (2, 2, 2, 2, 2, 1),
        PublishedFile(
            "PANNs Cnn14",
            "Cnn14_mAP=0.431.pth",
            "EMBEDKIT_PANNS_CNN14",
            "~/panns_data",
            ZENODO + "Cnn14_mAP%3D0.431.pth",
            size=327_428_481,
            md5="541141fa2ee191a88f24a3219fff024e",
        ),
    ),
    "cnn10": Arch(
        "cnn10",
        "Cnn10",
        (64, 128, 256, 512),
        (2, 2, 2, 2),
        PublishedFile(
            "PANNs Cnn10",
            "Cnn10_mAP=0.380.pth",
            "EMBEDKIT_PANNS_CNN10",
            "~/panns_data",
            ZENODO + "Cnn10_mAP%3D0.380.pth",
            size=25_237_595,
            md5="bfb1f1f9968938fa8ef4012b8471f5f6",
        ),
    ),
}


def _spec(arch: Arch, description: str) -> BackboneSpec:
    pub = arch.published
    return BackboneSpec(
        name=f"panns-{arch.key}",
        family="panns",
        sample_rate=SR,
        embedding_dim=arch.embedding_dim,
        segment_s=10.0,
        frontend=dict(FRONTEND),
        weights=f"{pub.filename} (Zenodo 3987831): --checkpoint, ${pub.env_var} or {pub.default_dir}/",
        weights_sha256=None,  # Zenodo publishes MD5s (checked at load); the file's SHA-256 is weights_id
        license="CC-BY-4.0 weights (Zenodo), MIT code",
        description=description,
        outputs=("clipwise",),
    )


SPECS = {
    "cnn14": _spec(
        ARCHS["cnn14"], "PANNs Cnn14 (AudioSet mAP 0.431): 2048-d fc1 embedding + 527 AudioSet probabilities"
    ),
    "cnn10": _spec(
        ARCHS["cnn10"],
        "PANNs Cnn10 (AudioSet mAP 0.380), ~1.7x cheaper than Cnn14: 512-d embedding + 527 AudioSet probabilities",
    ),
}


@lru_cache(maxsize=1)
def audioset_labels() -> list[str]:
    """The 527 AudioSet display names, in the output order of the PANNs and AST checkpoints."""
    text = resources.files("embedkit.backbones").joinpath("data/audioset_labels.csv").read_text(encoding="utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    return [r["display_name"] for r in sorted(rows, key=lambda r: int(r["index"]))]


@lru_cache(maxsize=1)
def canonical_frontend() -> dict[str, np.ndarray]:
    """Front-end tensors as torchlibrosa builds them (float32): windowed DFT kernels [513, 1, 1024]
    and the mel filterbank [513, 64]. Used for modules built without a checkpoint and to check
    that a checkpoint's front end is the one this spec describes. Cached: treat as read-only."""
    import librosa

    n = np.arange(N_FFT)
    k = np.arange(N_FFT // 2 + 1)
    window = librosa.filters.get_window("hann", N_FFT, fftbins=True)
    angle = 2 * np.pi * np.outer(k, n) / N_FFT
    real = (np.cos(angle) * window)[:, None, :].astype(np.float32)
    imag = (-np.sin(angle) * window)[:, None, :].astype(np.float32)
    mel = librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX).T.astype(np.float32)
    return {
        "spectrogram_extractor.stft.conv_real.weight": real,
        "spectrogram_extractor.stft.conv_imag.weight": imag,
        "logmel_extractor.melW": mel,
    }


@lru_cache(maxsize=1)
def _torch_classes():
    """Define the torch modules lazily so importing this file (registry listing) stays cheap."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Frozen(nn.Module):
        """Holds ``weight`` as a buffer: same state-dict key as torchlibrosa's frozen Conv1d."""

        def __init__(self, value: np.ndarray):
            super().__init__()
            self.register_buffer("weight", torch.from_numpy(value.copy()))

    class STFT(nn.Module):
        def __init__(self, fe: dict[str, np.ndarray]):
            super().__init__()
            self.conv_real = Frozen(fe["spectrogram_extractor.stft.conv_real.weight"])
            self.conv_imag = Frozen(fe["spectrogram_extractor.stft.conv_imag.weight"])

    class Spectrogram(nn.Module):
        """waveform [B, N] -> power spectrogram [B, 1, T, 513], T = 1 + N // 320."""

        def __init__(self, fe):
            super().__init__()
            self.stft = STFT(fe)

        def forward(self, x):
            x = F.pad(x[:, None, :], (N_FFT // 2, N_FFT // 2), mode="reflect")
            real = F.conv1d(x, self.stft.conv_real.weight, stride=HOP)
            imag = F.conv1d(x, self.stft.conv_imag.weight, stride=HOP)
            return (real**2 + imag**2).transpose(1, 2)[:, None]

    class LogmelFilterBank(nn.Module):
        """power [B, 1, T, 513] -> log-mel dB [B, 1, T, 64] (ref 1.0, amin 1e-10, no top_db)."""

        def __init__(self, fe):
            super().__init__()
            self.register_buffer("melW", torch.from_numpy(fe["logmel_extractor.melW"].copy()))

        def forward(self, x):
            return 10.0 * torch.log10(torch.clamp(torch.matmul(x, self.melW), min=1e-10))

    class ConvBlock(nn.Module):
        def __init__(self, cin: int, cout: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.bn2 = nn.BatchNorm2d(cout)

        def forward(self, x, pool: int):
            x = F.relu(self.bn1(self.conv1(x)))
            x = F.relu(self.bn2(self.conv2(x)))
            return F.avg_pool2d(x, pool) if pool > 1 else x

    class PannsCNN(nn.Module):
        """Cnn14 / Cnn10 of audioset_tagging_cnn. forward: waveform [B, N] -> embedding [B, D]."""

        def __init__(self, arch: Arch):
            super().__init__()
            fe = canonical_frontend()
            self.arch = arch
            self.spectrogram_extractor = Spectrogram(fe)
            self.logmel_extractor = LogmelFilterBank(fe)
            self.bn0 = nn.BatchNorm2d(N_MELS)
            cin = 1
            for i, c in enumerate(arch.channels, start=1):
                setattr(self, f"conv_block{i}", ConvBlock(cin, c))
                cin = c
            self.fc1 = nn.Linear(cin, cin)
            self.fc_audioset = nn.Linear(cin, N_CLASSES)

        def forward_both(self, x):
            """waveform [B, N] -> (embedding [B, D], clipwise probabilities [B, 527])."""
            x = self.logmel_extractor(self.spectrogram_extractor(x))  # [B, 1, T, 64]
            x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # bn0 normalises each mel band
            for i, pool in enumerate(self.arch.pools, start=1):
                x = getattr(self, f"conv_block{i}")(x, pool)
                x = F.dropout(x, p=0.2, training=self.training)
            x = torch.mean(x, dim=3)  # over frequency
            x = torch.amax(x, dim=2) + torch.mean(x, dim=2)  # max + mean over time
            x = F.dropout(x, p=0.5, training=self.training)
            x = F.relu(self.fc1(x))
            emb = F.dropout(x, p=0.5, training=self.training)
            return emb, torch.sigmoid(self.fc_audioset(x))

        def forward(self, x):
            return self.forward_both(x)[0]

    return PannsCNN


def build_module(arch: str = "cnn14", seed: int | None = None):
    """A PannsCNN in eval mode. With ``seed``, random weights drawn like the reference
    initialisation (Xavier-uniform convs/linears) plus random BatchNorm statistics, so tests
    exercise every parameter; without, torch's default init (weights are meant to be loaded)."""
    import torch
    from torch import nn

    a = ARCHS[arch]
    net = _torch_classes()(a)
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.xavier_uniform_(m.weight, generator=g)
                    if m.bias is not None:
                        m.bias.uniform_(-0.1, 0.1, generator=g)
                elif isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.normal_(0.0, 0.1, generator=g)
                    m.running_mean.normal_(0.0, 0.2, generator=g)
                    m.running_var.uniform_(0.5, 2.0, generator=g)
            # bn0 sees dB values: centre them like trained statistics would.
            net.bn0.running_mean.normal_(-30.0, 5.0, generator=g)
            net.bn0.running_var.uniform_(100.0, 400.0, generator=g)
    return net.eval()


def write_random_checkpoint(
    path: str | Path, arch: str = "cnn14", seed: int = 0, numpy_state: bool = True, **extra
) -> Path:
    """Save a seeded random model in the official checkpoint layout, for tests and benchmarks.

    The published files hold ``{"iteration", "model": state_dict, "sampler": ...}`` where the
    training sampler's state is NumPy arrays; with ``numpy_state`` the file carries such entries
    (and a NumPy scalar) too, so loaders meet the same pickle content. ``extra``: more entries.
    """
    import torch

    net = build_module(arch, seed=seed)
    rng = np.random.RandomState(seed)
    state = (
        {
            "sampler": {
                "indexes_per_class": [rng.permutation(7) for _ in range(3)],
                "queue": [2, 0, 1],
                "pointers_of_classes": [0, 3, 1],
            },
            "test_mAP": np.float64(0.5),
        }
        if numpy_state
        else {}
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"iteration": 0, **state, **extra, "model": net.state_dict()}, tmp)
    tmp.replace(path)
    return path


def _guess_arch(sd: dict) -> str | None:
    w = sd.get("fc1.weight")
    if w is None or getattr(w, "ndim", 0) != 2:
        return None
    for a in ARCHS.values():
        if (
            tuple(w.shape) == (a.embedding_dim, a.embedding_dim)
            and f"conv_block{len(a.channels)}.conv1.weight" in sd
            and f"conv_block{len(a.channels) + 1}.conv1.weight" not in sd
        ):
            return a.key
    return None


def _state_dict_from(ckpt, path: Path) -> dict:
    """The model state dict of an official checkpoint ({"model": sd, ...}) or a bare state dict."""
    import torch

    sd = ckpt.get("model") if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) else ckpt
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadingError(f"{path}: not a PANNs checkpoint (expected a dict with a 'model' state dict)")
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def load_state(net, sd: dict, path: Path, backbone: str) -> None:
    """Strictly load ``sd`` into ``net`` (which may live on the meta device); a different
    architecture or front end -> one clear line."""
    import torch

    expected = net.state_dict()
    optional = {k for k in expected if k.endswith("num_batches_tracked")}  # absent in pre-0.4.1 files
    missing = [k for k in expected if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        guess = _guess_arch(sd)
        hint = (
            f"it looks like a PANNs {ARCHS[guess].class_name} checkpoint: use --backbone panns-{guess}"
            if guess and f"panns-{guess}" != backbone
            else None
        )
        detail = (
            f"{len(missing)} missing (e.g. {missing[0]})"
            if missing
            else f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"
            if unexpected
            else f"{wrong[0]} has shape {list(sd[wrong[0]].shape)}, expected {list(expected[wrong[0]].shape)}"
        )
        raise ModelLoadingError(f"{path}: not a {backbone} checkpoint ({detail}){'; ' + hint if hint else ''}")
    # The spec promises a 32 kHz, 50-14000 Hz front end: refuse a file whose kernels say otherwise.
    for key, ref in canonical_frontend().items():
        got = sd[key].detach().float().numpy()
        if np.max(np.abs(got - ref)) > 1e-3 * max(1.0, float(np.max(np.abs(ref)))):
            raise ModelLoadingError(
                f"{path}: front end {key} differs from {backbone}'s (32 kHz, 1024/320, 64 mels 50-14000 Hz)"
            )
    # assign=True adopts the loaded tensors instead of copying into freshly initialised ones, so
    # the module can be built on the meta device (skips ~1 s of pointless random init for Cnn14).
    full = {
        k: (sd[k].float() if sd[k].is_floating_point() else sd[k]) if k in sd else torch.zeros((), dtype=torch.long)
        for k in expected
    }
    net.load_state_dict(full, strict=True, assign=True)


class PANNs(Backbone):
    """A loaded PANNs CNN. embed: float32 [B, L] at 32 kHz -> [B, D]."""

    def __init__(self, spec: BackboneSpec, net, weights_id: str, path: Path | None = None):
        import torch

        self.spec = spec
        self.net = net.eval()
        self.weights_id = weights_id
        self.path = path
        self._torch = torch

    def _run(self, segments: np.ndarray):
        y = np.ascontiguousarray(segments, dtype=np.float32)
        if y.ndim != 2:
            raise BackboneError(f"{self.spec.name}: segments must be [B, L], got shape {y.shape}")
        if y.shape[0] and y.shape[1] < MIN_SAMPLES:
            raise BackboneError(
                f"{self.spec.name}: segments must be at least {MIN_SAMPLES / SR:.2f} s ({MIN_SAMPLES} samples at {SR} Hz), got {y.shape[1]}"
            )
        d = self.spec.embedding_dim
        if y.shape[0] == 0:
            return np.zeros((0, d), np.float32), np.zeros((0, N_CLASSES), np.float32)
        with self._torch.inference_mode(), self._autocast():
            emb, clip = self.net.forward_both(self._input(y))
        return emb.float().cpu().numpy().astype(np.float32, copy=False), clip.float().cpu().numpy().astype(
            np.float32, copy=False
        )

    def embed(self, segments: np.ndarray) -> np.ndarray:
        return self._run(segments)[0]

    def outputs(self, segments: np.ndarray) -> dict[str, np.ndarray]:
        emb, clip = self._run(segments)
        return {"embedding": emb, "clipwise": clip}

    def output_labels(self, name: str) -> list[str]:
        if name != "clipwise":
            raise KeyError(name)
        return audioset_labels()

    def torch_module(self):
        return self.net


def load(spec: BackboneSpec, checkpoint: str | None = None, **_) -> PANNs:
    """Resolve (--checkpoint -> $EMBEDKIT_PANNS_* -> ~/panns_data/), verify, load strictly."""
    arch = ARCHS[spec.name.removeprefix("panns-")]
    path = resolve_file(arch.published, checkpoint)
    resolved = verify_file(path, arch.published)
    sd = _state_dict_from(load_torch_checkpoint(path), path)
    import torch

    with torch.device("meta"):
        net = _torch_classes()(arch)
    load_state(net, sd, path, spec.name)
    bb = PANNs(spec, net, resolved.sha256[:12], path)
    bb.official_weights = resolved.official  # False: a fine-tuned / test file, checked on structure only
    return bb


def identify(spec: BackboneSpec, checkpoint: str | None = None) -> tuple[str, BackboneSpec]:
    """weights_id of ``load(spec, checkpoint)`` (the verified file's SHA-256) without building
    the network or unpickling the checkpoint."""
    arch = ARCHS[spec.name.removeprefix("panns-")]
    path = resolve_file(arch.published, checkpoint)
    return verify_file(path, arch.published).sha256[:12], spec


for _key, _spec_ in SPECS.items():
    register_backbone(_spec_, load, identify=identify)
