"""`musicnn-msd` / `musicnn-mtt`: the pretrained musicnn taggers (Pons & Serra 2019) in PyTorch.

Weights are read from the TensorFlow checkpoint bundles that the ``musicnn`` 0.1.0 wheel ships as
package data (``musicnn/MSD_musicnn/``, ``musicnn/MTT_musicnn/``) by :mod:`.tfcheckpoint`, without
TensorFlow. ``scripts/install.sh`` unpacks them from the wheel into a data folder without
installing the wheel; :func:`package_dir` documents where they are looked for (an installed
``musicnn`` package, the old way, still counts). The network is a transcription of
``musicnn/models.py`` (``build_musicnn``):

* front end: log-mel [T, 96] -> batch-norm -> 5 branches, each conv -> ReLU -> batch-norm -> max
  over frequency: two timbral convs (204 filters of 7x38 and 7x67 over time x mel, time padded
  by 3) and three temporal convs (51 filters of 128x1, 64x1, 32x1, TF "same" padding) -> [T, 561];
* mid end: three 64-filter convs of 7 frames over all channels (dense + residual) -> [T, 753];
* back end: max and mean over time -> [1506] -> BN -> dense 200 + ReLU -> BN = **penultimate**
  (the 200-d embedding) -> dense 50 -> sigmoid = **taggram**.

Input pipeline (not musicnn's extractor, whose float16 log overflow and first-patch-only
features are not reproduced): ``librosa``-equivalent mel power S (sr 16 kHz, n_fft 512, hop 256,
96 Slaney bands, centred STFT) -> ``log10(10000 * S + 1)`` in float32, one patch per segment (a
5 s segment gives 313 frames; the network accepts any length).

Using the torch module (``Backbone.torch_module()``, also ``MusicnnNet``)::

    net = load_backbone("musicnn-msd").torch_module()   # nn.Module, eval mode
    emb = net(wave)                                      # [B, N] @ 16 kHz -> [B, 200]
    emb, tags = net.forward_with_taggram(wave)           # + sigmoid tag probabilities [B, 50]
    out = net.forward_logmel(logmel)                     # [B, T, 96] -> dict(penultimate, logits,
                                                         #   taggram, max_pool, mean_pool)
    net.logmel(wave)                                     # the front end alone: [B, T, 96]
    net.tag_head, net.labels                             # nn.Linear(200, 50) and its 50 tag names

Batch-norm: every BN layer runs in inference form, (x - moving_mean) / sqrt(moving_var + eps)
* gamma + beta, with the moving statistics frozen as buffers and gamma / beta trainable, so
``net.train()`` keeps the inference-time normalisation (no batch statistics, no running-stat
updates) while every weight stays trainable end to end. The original training used dropout 0.5
in the back end; the module has none (add it in your head if wanted).

Speed: in eval mode without autograd the module runs a *pruned plan* derived from the current
weights and rebuilt automatically after any in-place weight change (e.g. an optimizer step);
``net.use_pruned_plan = False`` forces the full network. Weight decay drove most front-end
filters to ~zero during training, so their output is a constant up to
``|gamma / std| * ||w||_1 * max|x|`` (MSD keeps 24, 14, 3, 7, 17 of the 204, 204, 51, 51, 51
filters of its five branches; MTT 145, 90, 43, 45, 50). Filters whose bound is below
``PRUNE_TOL`` = 1e-10 for normalised log-mel ``|x| <= PRUNE_X_MAX`` are replaced by that constant
and folded into the first mid-end conv: summed over all 561 channels their effect stays orders
of magnitude below float32 rounding. A batch whose normalised log-mel exceeds ``PRUNE_X_MAX``
(audio within [-1, 1] stays below ~2.1) runs the full network instead. Both paths are tested
against the golden TensorFlow outputs.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import ModelLoadingError
from .base import Backbone, BackboneSpec
from .registry import register_backbone

SR = 16000
N_FFT = 512
HOP = 256
N_MELS = 96
BN_EPS = 1e-3  # tf.compat.v1.layers.batch_normalization default
#: the old way to get the checkpoints (installs the wheel's metadata, which pins numpy<1.17 and
#: TensorFlow, so every later pip run reports a conflict); still found, no longer recommended
PIP = "pip install --no-deps musicnn==0.1.0"
#: how a fresh environment gets them (scripts/install.sh does this)
FETCH = "bash scripts/install.sh (or: pip download --no-deps musicnn==0.1.0; python -m embedkit.weights install-musicnn musicnn-0.1.0-py3-none-any.whl)"
DATA_FILE = ".data-00000-of-00001"
# Pruned plan: a filter is constant-folded when |gamma / std| * ||w||_1 * PRUNE_X_MAX <= PRUNE_TOL.
# PRUNE_X_MAX bounds the batch-normalised log-mel; audio in [-1, 1] stays below ~2.1 (MSD).
PRUNE_TOL = 1e-10
PRUNE_X_MAX = 4.0
# Temporal branches with fewer live filters than this run as a block-Toeplitz GEMM (blocks of
# TOEPLITZ_BLOCK output frames) instead of oneDNN's convolution (see _temporal_toeplitz).
TOEPLITZ_MAX_FILTERS = 32
TOEPLITZ_BLOCK = 16
# Export only: timbral filter counts are padded to a multiple of this (onnxruntime's NCHWc block:
# 16 floats with AVX-512, 8 with AVX2) so conv + max-pool stay in its blocked layout (_nchwc_plan).
NCHWC_BLOCK = 16

_COMMON = dict(
    family="musicnn",
    sample_rate=SR,
    embedding_dim=200,
    segment_s=5.0,
    frontend={
        "n_fft": N_FFT,
        "hop_length": HOP,
        "n_mels": N_MELS,
        "mel": "slaney",
        "center": True,
        "log": "log10(10000*S+1)",
        "patch": "whole segment",
    },
    weights="musicnn 0.1.0 wheel (package data)",
    license="ISC",
    outputs=("taggram",),
    requires=FETCH,
)
SPECS = {
    "musicnn-msd": BackboneSpec(
        name="musicnn-msd",
        weights_sha256="8579734ee6388f799ed0def4bbd0d1fdcbeaf213ef2a9dc860917bd76a303de6",
        description="musicnn trained on the Million Song Dataset (50 last.fm tags); 200-d penultimate layer",
        **_COMMON,
    ),
    "musicnn-mtt": BackboneSpec(
        name="musicnn-mtt",
        weights_sha256="041f3935e981a65cea739842d30c188d3a7d2adf4410955c8668eb3de4a5acab",
        description="musicnn trained on MagnaTagATune (50 tags); 200-d penultimate layer",
        **_COMMON,
    ),
}
_MODEL_DIR = {"musicnn-msd": "MSD_musicnn", "musicnn-mtt": "MTT_musicnn"}
#: SHA-256 of the packaged bundles' ``.index`` files: with the data file's (the spec's
#: weights_sha256) both files are known bytes, and the per-tensor CRC32C pass is redundant
_INDEX_SHA256 = {
    "musicnn-msd": "87f3e0f3550c8d3bafc840374003e5c8af5eeb5ecf6add61af09a7822d3282c8",
    "musicnn-mtt": "da2d7bb670b2b31e9bc441bb1bd75eca31b5b061f963cc1f9630c1aff3238f57",
}
_LABEL_ATTR = {"musicnn-msd": "MSD_LABELS", "musicnn-mtt": "MTT_LABELS"}
# TF layer names in creation order (models.build_musicnn): front-end branches, mid end, back end.
_FRONT = [  # (conv, bn, kind, time kernel)
    ("conv2d", "batch_normalization_1", "timbral", 7),
    ("conv2d_1", "batch_normalization_2", "timbral", 7),
    ("conv2d_2", "batch_normalization_3", "temporal", 128),
    ("conv2d_3", "batch_normalization_4", "temporal", 64),
    ("conv2d_4", "batch_normalization_5", "temporal", 32),
]
_MID = [
    ("conv2d_5", "batch_normalization_6"),
    ("conv2d_6", "batch_normalization_7"),
    ("conv2d_7", "batch_normalization_8"),
]


# ---------------------------------------------------------------------------------------------
# Where the checkpoints are. Lookup order, first folder that holds ``<MSD|MTT>_musicnn/`` with its
# data file wins (each folder has the wheel's layout: MSD_musicnn/, MTT_musicnn/,
# configuration.py for the tag names, LICENSE.md):
#
#   1. $EMBEDKIT_MUSICNN_DIR when set, and then only there (a wrong path is an error, not a
#      silent fall-back);
#   2. <sys.prefix>/share/embedkit/musicnn: where scripts/install.sh unpacks them (per
#      environment, like the package data it replaces; gone with the virtual environment);
#   3. ~/.cache/embedkit/musicnn: per user (install.sh's target when the environment is read-only);
#   4. an importable ``musicnn`` package (the old ``pip install --no-deps musicnn==0.1.0``), found
#      without importing it (its models.py imports TensorFlow).
#
# Nothing here downloads: scripts/install.sh runs ``pip download`` and
# ``python -m embedkit.weights install-musicnn`` (embedkit.weights.install_musicnn), which
# verifies the files below against their published SHA-256s.

DIR_ENV = "EMBEDKIT_MUSICNN_DIR"
WHEEL = "musicnn==0.1.0"
#: the one command that downloads and unpacks the checkpoints (in a checkout of embedkit)
INSTALL = "bash scripts/install.sh"
#: the same without the script (the folder only holds the downloaded wheel)
FETCH = (
    f"python -m pip download --no-deps {WHEEL} -d /tmp/musicnn-wheel"
    " && python -m embedkit.weights install-musicnn /tmp/musicnn-wheel"
)
#: wheel member (folder if it ends in "/") -> path in the checkpoint folder
WHEEL_MEMBERS = {
    "musicnn/MSD_musicnn/": "MSD_musicnn/",
    "musicnn/MTT_musicnn/": "MTT_musicnn/",
    "musicnn/configuration.py": "configuration.py",
    "musicnn-0.1.0.dist-info/LICENSE.md": "LICENSE.md",  # ISC: the notice travels with the copy
}
_CONFIG_SHA256 = "00fd595eb16bad3a605e10bb6eaf0152cb8125bed6e2c884a636f679ae100419"


def published_sha256() -> dict[str, str]:
    """Path in the checkpoint folder -> published SHA-256, for every file embedkit reads."""
    out = {"configuration.py": _CONFIG_SHA256}
    for name, folder in _MODEL_DIR.items():
        out[f"{folder}/{DATA_FILE}"] = SPECS[name].weights_sha256
        out[f"{folder}/.index"] = _INDEX_SHA256[name]
    return out


def search_path() -> list[tuple[str, Path]]:
    """(origin, folder) in lookup order (see above); only $EMBEDKIT_MUSICNN_DIR when it is set."""
    env = os.environ.get(DIR_ENV, "").strip()
    if env:
        return [(f"${DIR_ENV}", Path(os.path.expanduser(env)))]
    found = [
        ("environment data folder", Path(sys.prefix) / "share" / "embedkit" / "musicnn"),
        ("user data folder", Path.home() / ".cache" / "embedkit" / "musicnn"),
    ]
    try:
        spec = importlib.util.find_spec("musicnn")
    except (ImportError, ValueError):  # a broken or half-removed installation
        spec = None
    if spec is not None and spec.submodule_search_locations:
        found.append(("installed musicnn package", Path(list(spec.submodule_search_locations)[0])))
    return found


def default_install_dir() -> Path:
    """Where ``python -m embedkit.weights install-musicnn`` puts the checkpoints by default:
    $EMBEDKIT_MUSICNN_DIR, else the environment's data folder when writable, else the user's."""
    dirs = [p for origin, p in search_path() if origin != "installed musicnn package"]
    if len(dirs) == 1:
        return dirs[0]
    env_dir, user_dir = dirs
    probe = env_dir
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return env_dir if os.access(probe, os.W_OK) else user_dir


def _model_data(root: Path, name: str) -> Path:
    return root / _MODEL_DIR[name] / DATA_FILE


def package_dir(name: str = "musicnn-msd") -> Path:
    """The folder holding ``<MSD|MTT>_musicnn/`` and ``configuration.py`` for backbone ``name``,
    the first in lookup order (see above). Raises ModelLoadingError, one line naming every place
    looked at and how to get the files, when none has them. (Named for the installed package it
    used to be; any folder with the wheel's layout qualifies.)"""
    looked = search_path()
    for _origin, root in looked:
        if _model_data(root, name).is_file():
            return root
    need = f"{_MODEL_DIR[name]}/{DATA_FILE}"
    if looked[0][0] == f"${DIR_ENV}":
        raise ModelLoadingError(
            f"{name} checkpoint not found: ${DIR_ENV}={looked[0][1]} has no {need}; unpack the "
            f"checkpoints there with `{FETCH}`, or unset {DIR_ENV}"
        )
    places = "; ".join(str(root) for _o, root in looked)
    if not any(o == "installed musicnn package" for o, _r in looked):
        places += "; an installed musicnn package (none)"
    raise ModelLoadingError(
        f"{name} checkpoint ({need}) not found; looked in, in order: {places}. Get it with `{INSTALL}` "
        f"or `{FETCH}` (unpacks into {default_install_dir()}), or set {DIR_ENV} to a folder holding "
        f"{_MODEL_DIR[name]}/ and configuration.py (the old `{PIP}` also still works)"
    )


def checkpoints_available(name: str = "musicnn-msd") -> bool:
    """True when ``package_dir(name)`` finds a checkpoint folder (for tests; nothing verified)."""
    try:
        package_dir(name)
        return True
    except ModelLoadingError:
        return False


def _labels(name: str, pkg: Path) -> list[str]:
    """The 50 tag names from musicnn/configuration.py, read as literals (importing the package
    is avoided: its models.py pulls in TensorFlow)."""
    path = pkg / "configuration.py"
    try:
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == _LABEL_ATTR[name] for t in node.targets):
                return [str(x) for x in ast.literal_eval(node.value)]
        raise KeyError(_LABEL_ATTR[name])
    except (OSError, KeyError, SyntaxError, ValueError) as exc:
        raise ModelLoadingError(
            f"{path}: cannot read the tag names ({exc!r}); reinstall the checkpoints with `{INSTALL}` or `{FETCH}`"
        ) from exc


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def read_weights(prefix: str | os.PathLike, verify: bool = True) -> dict[str, np.ndarray]:
    """Model tensors (optimizer slots dropped) of a musicnn bundle, CRC-checked unless
    ``verify`` is False (both files already checked against known SHA-256s)."""
    from .tfcheckpoint import TFCheckpoint

    ckpt = TFCheckpoint(prefix, verify=verify)
    names = [k for k in ckpt.keys() if "/Adam" not in k and not k.endswith("_power")]
    bns = [f"batch_normalization{'_%d' % i if i else ''}" for i in range(11)]
    convs = [c for c, *_ in _FRONT + _MID] + ["dense", "dense_1"]
    needed = {f"{c}/{p}" for c in convs for p in ("kernel", "bias")} | {
        f"{b}/{p}" for b in bns for p in ("gamma", "beta", "moving_mean", "moving_variance")
    }
    missing = sorted(needed - set(names))
    if missing:
        raise ModelLoadingError(f"{ckpt.index_path}: not a musicnn checkpoint (missing {missing[0]})")
    return {k: ckpt.read(k) for k in names}


# ---------------------------------------------------------------------------------------------
# torch parts, built on first use so that importing this module (the registry) stays cheap.


def __getattr__(name: str):
    # PEP 562: `from embedkit.backbones.musicnn import MusicnnNet` (and unpickling, e.g.
    # torch.save of the whole module) builds the torch classes lazily; their
    # __module__/__qualname__ point back here.
    if name in ("MusicnnNet", "LogMel", "BNAffine"):
        return _torch_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@lru_cache(maxsize=1)
def _torch_classes() -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from ..audio.melspec import MelSpectrogram

    class LogMel(nn.Module):
        """waveform [B, N] float32 @ 16 kHz -> log10(10000 * mel power + 1) [B, T, 96],
        T = 1 + N // 256 (librosa's centred, zero-padded STFT)."""

        def __init__(self):
            super().__init__()
            self.mel = MelSpectrogram(SR, N_FFT, HOP, N_MELS, pad_mode="constant")

        def forward(self, y: torch.Tensor) -> torch.Tensor:
            return torch.log10(self.mel(y) * 10000.0 + 1.0).transpose(1, 2)

    class BNAffine(nn.Module):
        """Inference-form batch norm: (x - moving_mean) / std * gamma + beta along channel axis
        ``dim``, std = sqrt(moving_var + eps); the statistics are frozen buffers, gamma / beta
        trainable. Kept in TF's order of operations rather than folded into one multiply-add:
        several filters have gains |gamma| / std ~40 after conv weights with L1 norm ~20, so
        moving a rounding step costs ~5e-5 at the front-end output."""

        def __init__(self, weights: dict[str, np.ndarray], bn: str, order=None):
            super().__init__()
            vals = [weights[f"{bn}/{k}"] for k in ("moving_mean", "moving_variance", "gamma", "beta")]
            if order is not None:
                vals = [v[order] for v in vals]
            mean, var, gamma, beta = (torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for v in vals)
            self.register_buffer("center", mean)
            self.register_buffer("std", torch.sqrt(var + BN_EPS))
            self.gamma, self.beta = nn.Parameter(gamma), nn.Parameter(beta)

        @property
        def scale(self) -> torch.Tensor:
            """Per-channel gain gamma / std (its sign decides max- vs min-pooling)."""
            return self.gamma / self.std

        def forward(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
            shape = [1] * x.dim()
            shape[dim] = -1
            c, s, g, b = (v.view(shape) for v in (self.center, self.std, self.gamma, self.beta))
            return (x - c) / s * g + b

    def _front_pad(kind: str, k: int) -> tuple[int, int]:
        # timbral: explicit 3-frame pad + "valid" conv; temporal: TF "same" for stride 1, which
        # puts the extra pad of an even kernel after the input.
        return (3, 3) if kind == "timbral" else ((k - 1) // 2, k - 1 - (k - 1) // 2)

    def _front_conv(xh: torch.Tensor, w, b, kind: str, pad: tuple[int, int]) -> torch.Tensor:
        """Max over frequency of conv(xh) (before ReLU/BN): xh [B, T, 96] -> [B, T, C].

        The input is a view with TF's NHWC strides (channel stride 1): torch then runs oneDNN's
        channels-last convolution, as TF does, which is both the fastest variant here and
        bit-identical to a transcription of the TF graph (~10x closer to the golden outputs
        than the NCHW kernel). Its output is channels-last too; max_pool2d reduces that layout
        ~10x faster than amax over the frequency axis of a [B, T, F, C] view."""
        if kind == "timbral":
            inp = F.pad(xh, (0, 0, *pad)).unsqueeze(3).permute(0, 3, 1, 2)
        else:
            inp = F.pad(xh.unsqueeze(3).permute(0, 3, 1, 2), (0, 0, *pad))
        u = F.conv2d(inp, w, b)  # [B, C, T, F'], channels-last
        return F.max_pool2d(u, (1, u.shape[3]))[..., 0].transpose(1, 2)

    def _branch(xh: torch.Tensor, w, b, bn, kind: str, k: int) -> torch.Tensor:
        """One front-end branch, [B, T, 96] -> [B, T, C]: max over frequency of BN(ReLU(conv)).

        BN follows the ReLU, so max_f BN(relu(u)) = BN(relu(max_f u)) for a positive BN gain
        and BN(relu(min_f u)) for a negative one: flipping the sign of those filters turns both
        into one max, and BN/ReLU run on [B, T, C] instead of the 30-96x larger conv map."""
        sign = torch.where(bn.scale < 0, -1.0, 1.0).detach()
        m = _front_conv(xh, w * sign[:, None, None, None], b * sign, kind, _front_pad(kind, k))
        return bn(torch.relu(m * sign))

    def _toeplitz_weight(w: torch.Tensor, block: int) -> torch.Tensor:
        """[C, 1, k, 1] temporal filters -> [block + k - 1, block * C]: column (t, c) holds
        filter c shifted to output step t, so one GEMM row maps a window of block + k - 1 input
        frames to ``block`` consecutive outputs of every filter."""
        C, k = w.shape[0], w.shape[2]
        wt = w.new_zeros(block + k - 1, block, C)
        for t in range(block):
            wt[t : t + k, t, :] = w[:, 0, :, 0].t()
        return wt.reshape(block + k - 1, block * C)

    def _temporal_toeplitz(xh: torch.Tensor, wt: torch.Tensor, k: int, pad_before: int) -> torch.Tensor:
        """Max over frequency of a [k, 1] conv (no bias) as a block-Toeplitz GEMM: [B, T, 96] ->
        [B, T, C]. Why: with few filters (pruned MSD branches keep 3-17 of 51) oneDNN's
        one-input-channel kernel leaves most of each 16-wide vector idle; the GEMM streams
        blocks of TOEPLITZ_BLOCK outputs per row instead (3x faster measured on 3-17 filters)."""
        B, T, n_freq = xh.shape
        block = TOEPLITZ_BLOCK
        C = wt.shape[1] // block
        nblk = -(-T // block)
        xp = F.pad(xh.transpose(1, 2), (pad_before, nblk * block + k - 1 - pad_before - T))  # [B, 96, L]
        out = []
        # chunk the batch so the [rows, block * C] product stays ~16 MB
        step = max(1, (1 << 22) // (n_freq * nblk * block * C))
        for i in range(0, B, step):
            win = xp[i : i + step].unfold(2, block + k - 1, block)  # [b, 96, nblk, block+k-1]
            y = torch.matmul(win.reshape(-1, block + k - 1), wt)
            out.append(y.view(-1, n_freq, nblk * block, C).amax(dim=1)[:, :T])
        return torch.cat(out) if len(out) > 1 else out[0]

    class MusicnnNet(nn.Module):
        """musicnn as one torch module: waveform [B, N] @ 16 kHz -> penultimate [B, 200].

        See the module docstring for the API (forward_with_taggram, forward_logmel, logmel,
        tag_head, labels), the batch-norm semantics and the pruned inference plan."""

        def __init__(self, weights: dict[str, np.ndarray], labels: list[str]):
            super().__init__()
            t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
            self.labels = list(labels)
            self.logmel = LogMel()
            self.in_bn = BNAffine(weights, "batch_normalization")  # one channel: a scalar affine
            self.front_kind = [(kind, k) for _, _, kind, k in _FRONT]
            self.front_w, self.front_b, self.front_bn = nn.ParameterList(), nn.ParameterList(), nn.ModuleList()
            for conv, bn, _, _ in _FRONT:
                # TF kernels are [kh, kw, in, out]; torch wants [out, in, kh, kw].
                self.front_w.append(nn.Parameter(t(weights[f"{conv}/kernel"]).permute(3, 2, 0, 1).contiguous()))
                self.front_b.append(nn.Parameter(t(weights[f"{conv}/bias"])))
                self.front_bn.append(BNAffine(weights, bn))
            self.mid_w, self.mid_b, self.mid_bn = nn.ParameterList(), nn.ParameterList(), nn.ModuleList()
            for conv, bn in _MID:
                # TF slides a [7, C] kernel over the transposed [T, C] map: a conv1d over time
                # with C input channels, [7, C, 1, 64] -> [64, C, 7]. (TF's own conv2d form is
                # 6x slower in torch; its different summation order costs ~4e-6 of parity.)
                self.mid_w.append(nn.Parameter(t(weights[f"{conv}/kernel"])[:, :, 0, :].permute(2, 1, 0).contiguous()))
                self.mid_b.append(nn.Parameter(t(weights[f"{conv}/bias"])))
                self.mid_bn.append(BNAffine(weights, bn))
            n_feat = weights["dense/kernel"].shape[0] // 2  # 753
            # TF flattens [max, mean] stacked on the last axis (index 2*c + j); reorder once to
            # concatenated [max(753), mean(753)].
            order = np.concatenate([np.arange(n_feat) * 2, np.arange(n_feat) * 2 + 1])
            self.pool_bn = BNAffine(weights, "batch_normalization_9", order)
            self.dense = nn.Linear(2 * n_feat, weights["dense/kernel"].shape[1])
            self.dense.weight = nn.Parameter(t(weights["dense/kernel"][order].T))
            self.dense.bias = nn.Parameter(t(weights["dense/bias"]))
            self.pen_bn = BNAffine(weights, "batch_normalization_10")
            self.tag_head = nn.Linear(*weights["dense_1/kernel"].shape)
            self.tag_head.weight = nn.Parameter(t(weights["dense_1/kernel"].T))
            self.tag_head.bias = nn.Parameter(t(weights["dense_1/bias"]))
            self.use_pruned_plan = True  # False forces the full network (benchmarks, checks)
            self._plan = None
            self._plan_key = None
            self.eval()

        # -- API ---------------------------------------------------------------------------
        def forward(self, y: torch.Tensor) -> torch.Tensor:
            """waveform [B, N] float32 @ 16 kHz -> penultimate embedding [B, 200]."""
            return self.forward_logmel(self.logmel(y))["penultimate"]

        def forward_with_taggram(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """waveform [B, N] -> (penultimate [B, 200], taggram = sigmoid tag probabilities [B, 50])."""
            out = self.forward_logmel(self.logmel(y))
            return out["penultimate"], out["taggram"]

        def forward_logmel(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            """log-mel patches [B, T, 96] (any T >= 1) -> penultimate [B, 200], logits and
            taggram [B, 50], max_pool / mean_pool [B, 753] (musicnn's feature names)."""
            if x.dim() != 3 or x.shape[-1] != N_MELS:
                raise ValueError(f"log-mel must be [B, T, {N_MELS}], got {tuple(x.shape)}")
            xh = self.in_bn(x)
            use_plan = self.use_pruned_plan and not self.training and not torch.is_grad_enabled()
            if use_plan and x.shape[0] and float(xh.abs().amax()) <= PRUNE_X_MAX:
                front, mid1 = self._front_pruned(xh)
            else:
                front = torch.cat(
                    [
                        _branch(xh, w, b, bn, kind, k)
                        for (kind, k), w, b, bn in zip(self.front_kind, self.front_w, self.front_b, self.front_bn)
                    ],
                    2,
                )
                front = front.transpose(1, 2).contiguous()  # [B, 561, T] for the conv1d mid end
                mid1 = F.conv1d(front, self.mid_w[0], self.mid_b[0], padding=3)
            return self._rest(front, mid1)

        # -- internals ---------------------------------------------------------------------
        def _rest(self, front: torch.Tensor, mid1: torch.Tensor) -> dict[str, torch.Tensor]:
            """front [B, 561, T] and the first mid-end conv's output [B, 64, T] -> all outputs."""
            h = self.mid_bn[0](torch.relu(mid1), 1)
            feats = [front, h]
            for i in (1, 2):  # residual convs
                h = self.mid_bn[i](torch.relu(F.conv1d(h, self.mid_w[i], self.mid_b[i], padding=3)), 1) + h
                feats.append(h)
            mid = torch.cat(feats, 1)  # [B, 753, T]
            max_pool, mean_pool = mid.amax(dim=2), mid.mean(dim=2)
            pooled = self.pool_bn(torch.cat([max_pool, mean_pool], 1))
            pen = self.pen_bn(torch.relu(self.dense(pooled)))
            logits = self.tag_head(pen)
            return {
                "penultimate": pen,
                "logits": logits,
                "taggram": torch.sigmoid(logits),
                "max_pool": max_pool,
                "mean_pool": mean_pool,
            }

        def _weights_key(self) -> tuple:
            return tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))

        def plan(self) -> dict:
            """The pruned inference plan for the current weights (see module docstring)."""
            key = self._weights_key()
            if self._plan is None or self._plan_key != key:
                with torch.no_grad():
                    self._plan = self._build_plan()
                self._plan_key = key
            return self._plan

        def _build_plan(self) -> dict:
            branches, consts, live_all = [], [], []
            offset = 0
            for (kind, k), w, b, bn in zip(self.front_kind, self.front_w, self.front_b, self.front_bn):
                bound = bn.scale.abs() * w.abs().sum(dim=(1, 2, 3)) * PRUNE_X_MAX
                live = torch.nonzero(bound > PRUNE_TOL).flatten()
                consts.append(bn(torch.relu(b)))  # a pruned filter's output, within PRUNE_TOL
                sign = torch.where(bn.scale[live] < 0, -1.0, 1.0)
                w_live = (w[live] * sign[:, None, None, None]).contiguous()
                toeplitz = kind == "temporal" and 0 < len(live) < TOEPLITZ_MAX_FILTERS
                branches.append(
                    {
                        "kind": kind,
                        "k": k,
                        "pad": _front_pad(kind, k),
                        "toeplitz": _toeplitz_weight(w_live, TOEPLITZ_BLOCK) if toeplitz else None,
                        "w": w_live,
                        "b": (b[live] * sign).contiguous(),
                        "sign": sign,
                        "bn": [v[live].contiguous() for v in (bn.center, bn.std, bn.gamma, bn.beta)],
                    }
                )
                live_all.append(live + offset)
                offset += w.shape[0]
            const = torch.cat(consts)
            live = torch.cat(live_all)
            dead = torch.ones(offset, dtype=torch.bool, device=const.device)
            dead[live] = False
            w0 = self.mid_w[0]  # [64, 561, 7]
            # Constant channels enter the first mid-end conv as const * (sum of the taps that
            # fall inside the zero-padded clip): a 1-channel conv of ones reproduces the edges.
            w_const = (w0[:, dead] * const[dead][:, None]).sum(1, keepdim=True)
            return {
                "branches": branches,
                "live": live,
                "const": const,
                "w_live": w0[:, live].contiguous(),
                "w_const": w_const.contiguous(),
            }

        def _front_pruned(self, xh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return _pruned_front(self.plan(), xh, self.mid_b[0], _temporal_toeplitz)

    def _pruned_front(p: dict, xh: torch.Tensor, mid_b0: torch.Tensor, toeplitz) -> tuple[torch.Tensor, torch.Tensor]:
        """The front end and first mid-end conv through a pruned plan (``MusicnnNet.plan``):
        (front [B, 561, T], mid1 [B, 64, T]). ``toeplitz``: how temporal branches with a
        Toeplitz weight are computed (chunked for speed, or one GEMM for export)."""
        parts = []
        for br in p["branches"]:
            if br["w"].shape[0] == 0:
                continue
            if br["toeplitz"] is not None:  # bias commutes with the max over frequency
                m = toeplitz(xh, br["toeplitz"], br["k"], br["pad"][0]) + br["b"]
            else:
                # [..., :n]: the export plan pads timbral filters with zeros (_nchwc_plan)
                m = _front_conv(xh, br["w"], br["b"], br["kind"], br["pad"])[..., : len(br["sign"])]
            center, std, gamma, beta = br["bn"]
            parts.append((torch.relu(m * br["sign"]) - center) / std * gamma + beta)
        B, T = xh.shape[0], xh.shape[1]
        live_feats = (torch.cat(parts, 2) if parts else xh.new_zeros(B, T, 0)).transpose(1, 2).contiguous()
        front = p["const"][None, :, None].expand(B, -1, T).clone()
        front[:, p["live"]] = live_feats
        mid1 = F.conv1d(live_feats, p["w_live"], mid_b0, padding=3) + F.conv1d(
            xh.new_ones(1, 1, T), p["w_const"], padding=3
        )
        return front, mid1

    def _temporal_toeplitz_whole(xh: torch.Tensor, wt: torch.Tensor, k: int, pad_before: int) -> torch.Tensor:
        """``_temporal_toeplitz`` in one GEMM over the whole batch (no Python loop over a
        batch-size-dependent chunk count, so torch.export can trace a dynamic batch). The
        overlapping input windows are r = ceil((block + k - 1) / block) block-shifted views of
        one [.., nblk + r - 1, block] reshape, concatenated (and ``wt`` zero-padded to r * block
        rows): ``unfold`` exports as index Gathers, 11 % of onnxruntime's kernel time.
        Frequency stays the last axis (xh's own layout: no transpose) and the max over it is a
        reduction over contiguous memory, which onnxruntime runs ~2x faster than over axis 1."""
        B, T, n_freq = xh.shape
        block = TOEPLITZ_BLOCK
        C = wt.shape[1] // block
        nblk = -(-T // block)
        r = -(-(block + k - 1) // block)
        xp = F.pad(xh, (0, 0, pad_before, (nblk + r - 1) * block - pad_before - T))  # [B, L, 96]
        z = xp.reshape(B, nblk + r - 1, block, n_freq)
        win = torch.cat([z[:, j : j + nblk] for j in range(r)], 2)  # [B, nblk, r * block, 96]
        wt_t = F.pad(wt, (0, 0, 0, r * block - wt.shape[0])).t().contiguous()  # [block * C, r * block]
        y = torch.matmul(wt_t, win)  # [B, nblk, block * C, 96]
        return y.amax(dim=-1).reshape(B, nblk * block, C)[:, :T]

    def _nchwc_plan(plan: dict) -> dict:
        """The pruned plan with each timbral branch's filters zero-padded to a multiple of
        NCHWC_BLOCK (its output is cut back in _pruned_front). onnxruntime's NCHWc layout pass
        (graph optimisation level "all") pads the filters of a convolution to its block anyway,
        but with an unaligned count it converts the [B, C, T, F] map back to NCHW before the max
        over frequency; aligned, the max-pool runs blocked too and only the pooled [B, C, T]
        is converted (24 -> 32 and 14 -> 16 filters: the two branches ~0.8x the time)."""
        branches = []
        for br in plan["branches"]:
            n = br["w"].shape[0]
            extra = -n % NCHWC_BLOCK if br["kind"] == "timbral" and n else 0
            if extra:
                br = {
                    **br,
                    "w": torch.cat([br["w"], br["w"].new_zeros(extra, *br["w"].shape[1:])]),
                    "b": torch.cat([br["b"], br["b"].new_zeros(extra)]),
                }
            branches.append(br)
        return {**plan, "branches": branches}

    class MusicnnExport(nn.Module):
        """A MusicnnNet as one static graph for torch.export / ONNX: waveform -> penultimate.
        The batch-wide choice between the pruned plan and the full network (``forward_logmel``)
        becomes ``torch.cond`` (an ONNX ``If``), so the exported model computes what the torch
        module computes for every input, loud ones included, at the pruned plan's speed."""

        def __init__(self, net: "MusicnnNet"):
            super().__init__()
            self.net = net.eval()
            with torch.no_grad():
                self.plan = _nchwc_plan(net.plan())

        def _pruned(self, xh):
            front, mid1 = _pruned_front(self.plan, xh, self.net.mid_b[0], _temporal_toeplitz_whole)
            return self.net._rest(front, mid1)["penultimate"]

        def _full(self, xh):
            n = self.net
            front = torch.cat(
                [
                    _branch(xh, w, b, bn, kind, k)
                    for (kind, k), w, b, bn in zip(n.front_kind, n.front_w, n.front_b, n.front_bn)
                ],
                2,
            )
            front = front.transpose(1, 2).contiguous()
            return n._rest(front, F.conv1d(front, n.mid_w[0], n.mid_b[0], padding=3))["penultimate"]

        def forward(self, y: torch.Tensor) -> torch.Tensor:
            xh = self.net.in_bn(self.net.logmel(y))
            if not self.net.use_pruned_plan:
                return self._full(xh)
            return torch.cond(xh.abs().amax(dim=(0, 1, 2)) <= PRUNE_X_MAX, self._pruned, self._full, (xh,))

    MusicnnNet.export_module = lambda self: MusicnnExport(self)
    MusicnnNet.export_module.__doc__ = "The network as one static graph for ONNX export (MusicnnExport)."

    classes = {"MusicnnNet": MusicnnNet, "LogMel": LogMel, "BNAffine": BNAffine, "MusicnnExport": MusicnnExport}
    for name, cls in classes.items():  # picklable by reference through __getattr__ above
        cls.__module__, cls.__qualname__ = __name__, name
    return classes


# ---------------------------------------------------------------------------------------------
# Backbone


class Musicnn(Backbone):
    """A loaded musicnn model. embed: segments [B, L] float32 @ 16 kHz -> [B, 200]."""

    def __init__(self, spec: BackboneSpec, checkpoint: str | os.PathLike | None = None):
        import torch

        self.spec = spec
        pkg = package_dir(spec.name)  # the first folder in lookup order (see package_dir)
        if checkpoint is None:
            prefix = pkg / _MODEL_DIR[spec.name]
            data = prefix / DATA_FILE
            sha = file_sha256(data)
            if sha != spec.weights_sha256:
                raise ModelLoadingError(
                    f"{data}: SHA-256 {sha[:12]}... is not the musicnn 0.1.0 checkpoint ({spec.weights_sha256[:12]}...); reinstall it with `{INSTALL}` or `{FETCH}`"
                )
            # the bundle's files are named ".index"/".data-*" inside the folder: prefix = folder + "/"
            prefix_str = str(prefix) + os.sep
            # the published bytes, both files: no need for the CRC32C pass (~60 ms of start-up)
            verify = file_sha256(prefix_str + ".index") != _INDEX_SHA256.get(spec.name)
        else:
            # A user-supplied bundle prefix (e.g. a copied or re-trained musicnn checkpoint).
            prefix_str = str(checkpoint)
            if os.path.isdir(prefix_str):
                prefix_str = os.path.join(prefix_str, "")
            data = Path(prefix_str + DATA_FILE)
            if not data.exists():
                raise ModelLoadingError(f"{data}: no musicnn checkpoint data file at this prefix")
            verify = True
            sha = file_sha256(data)
            # the artefacts must describe these weights, not the packaged ones
            self.spec = dataclasses.replace(spec, weights=f"TF checkpoint {prefix_str}", weights_sha256=sha)
        self.weights_id = sha[:12]
        self._labels = _labels(spec.name, pkg)
        try:
            self.module = _torch_classes()["MusicnnNet"](read_weights(prefix_str, verify), self._labels)
            with torch.inference_mode():  # shapes that do not chain fail here, not mid-extraction
                tags = self.module.forward_logmel(torch.zeros(1, 8, N_MELS))["taggram"]
        except (RuntimeError, ValueError, IndexError) as exc:
            raise ModelLoadingError(f"{data}: tensors do not fit the musicnn architecture ({exc})") from exc
        if tags.shape[1] != len(self._labels):
            raise ModelLoadingError(f"{data}: {tags.shape[1]} outputs but {len(self._labels)} tag names")
        self._torch = torch

    def _run(self, segments: np.ndarray) -> dict[str, np.ndarray]:
        y = np.asarray(segments, dtype=np.float32)
        if y.ndim != 2:
            raise ValueError(f"segments must be [B, L], got shape {y.shape}")
        if y.shape[0] == 0:
            return {
                "embedding": np.zeros((0, 200), np.float32),
                "taggram": np.zeros((0, len(self._labels)), np.float32),
            }
        torch = self._torch
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.inference_mode(), self._autocast():
                out = self.module.forward_logmel(self.module.logmel(self._input(y)))
        finally:
            self.module.train(was_training)
        return {
            "embedding": out["penultimate"].float().cpu().numpy().copy(),
            "taggram": out["taggram"].float().cpu().numpy().copy(),
        }

    def embed(self, segments: np.ndarray) -> np.ndarray:
        return self._run(segments)["embedding"]

    def outputs(self, segments: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(segments)

    def output_labels(self, name: str) -> list[str]:
        if name != "taggram":
            raise KeyError(name)
        return list(self._labels)

    def torch_module(self):
        return self.module


def _load(spec: BackboneSpec, checkpoint: str | None = None, **_) -> Musicnn:
    return Musicnn(spec, checkpoint)


def _identify(spec: BackboneSpec, checkpoint: str | None = None) -> tuple[str, BackboneSpec] | None:
    """weights_id and spec of ``Musicnn(spec, checkpoint)`` from the checkpoint data file's hash
    alone; None when loading would fail (it then reports why)."""
    try:
        if checkpoint is None:
            data = _model_data(package_dir(spec.name), spec.name)
            sha = file_sha256(data)
            return (sha[:12], spec) if sha == spec.weights_sha256 else None
        prefix_str = os.path.join(str(checkpoint), "") if os.path.isdir(str(checkpoint)) else str(checkpoint)
        sha = file_sha256(prefix_str + DATA_FILE)
        return sha[:12], dataclasses.replace(spec, weights=f"TF checkpoint {prefix_str}", weights_sha256=sha)
    except (OSError, ModelLoadingError):
        return None


for _spec in SPECS.values():
    register_backbone(_spec, _load, identify=_identify)
