"""Log-mel features for the scratch CNN, the per-clip caches and the train-only normaliser.

Features: 44.1 kHz, n_fft 2048, hop 512, 128 Slaney mel bands (``embedkit.audio.melspec``, which
matches librosa), power to dB against a fixed reference of 1.0. A fixed reference (not the
per-example maximum) makes a crop of the cached clip spectrogram and the spectrogram of the
same cropped waveform agree, so cached and on-the-fly features are interchangeable.

Caches (one ``.npy`` per clip, memory-mapped on read, written atomically so an interrupted
build resumes and never leaves a torn file)::

    <cache>/cnn-logmel/<config hash>/<clip key>.npy        float16 [n_mels, T]
    <cache>/cnn-wave/<config hash>/<clip key>.npy          float32 [N]      (online aug, finetune)
    <cache>/cnn-pool/<config hash>/<clip key>.npy          [pool_size, ...] pre-augmented variants (data.build_pool)

The clip key is the file's content fingerprint (``embedkit.identity``, the rule the embedding
store follows): an edited file is computed again, and the same audio under two names or in two
datasets is computed once. Fingerprints are remembered in ``<cache>/fingerprints.json`` by
(size, mtime_ns, inode), so a run over unchanged files reads none of their bytes to key them.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..config import AudioConfig, stable_hash
from ..errors import AudioError, ConfigError, DatasetError
from ..identity import SCHEME

CACHE_VERSION = 2  # 2: clip keys are content fingerprints (1: path, size and mtime)


@dataclass(frozen=True)
class FeatureConfig:
    """Log-mel front end of the scratch CNN (stored in every model file)."""

    sample_rate: int = 44100
    n_fft: int = 2048
    hop_length: int = 512
    n_mels: int = 128
    f_min: float = 0.0
    f_max: float | None = None
    amin: float = 1e-10  # power floor before log: digital silence maps to -100 dB

    def n_frames(self, n_samples: int) -> int:
        """Frames of a centred STFT over n_samples (431 for 5 s at 44.1 kHz / hop 512)."""
        return 1 + n_samples // self.hop_length


def logmel_module(cfg: FeatureConfig):
    """torch module: waveform [B, N] float32 -> log-mel dB [B, n_mels, 1 + N // hop]."""
    import torch
    from torch import nn

    from ..audio.melspec import MelSpectrogram

    class LogMel(nn.Module):
        def __init__(self):
            super().__init__()
            self.mel = MelSpectrogram(cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.n_mels, cfg.f_min, cfg.f_max)

        def forward(self, y):
            return 10.0 * torch.log10(torch.clamp(self.mel(y), min=cfg.amin))

    return LogMel().eval()


_MODULES: dict[FeatureConfig, Any] = {}


def logmel(y: np.ndarray, cfg: FeatureConfig = FeatureConfig()) -> np.ndarray:
    """waveform [N] or [B, N] float32 at cfg.sample_rate -> log-mel dB float32 [(B,) M, T]."""
    import torch

    if cfg not in _MODULES:
        _MODULES[cfg] = logmel_module(cfg)
    x = torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    with torch.inference_mode():
        out = _MODULES[cfg](x[None] if x.dim() == 1 else x)
    out = out.numpy()
    return out[0] if np.ndim(y) == 1 else out


# ---------------------------------------------------------------------------------------------
# Per-clip array caches


def clip_key(path: str | os.PathLike, known: dict | None = None, scheme: str | None = None) -> str:
    """Identity of a file's contents for caching: its content fingerprint (in ``scheme``, by
    default identity.SCHEME)."""
    from ..identity import fingerprint

    return fingerprint(path, known, scheme or SCHEME)


class ClipCache:
    """One memory-mapped array per clip, computed once by ``compute(path) -> ndarray``.

    ``kind`` names the folder (cnn-logmel, cnn-wave, cnn-pool); ``identity`` (the config that determines
    the arrays) is hashed into the folder name so different configurations never mix. The arrays
    are named by content fingerprint, in the scheme the folder's cache.json records (a folder
    made before schemes: identity.LEGACY, so its arrays keep being found).
    """

    def __init__(
        self, root: str | os.PathLike, kind: str, identity: dict[str, Any], compute: Callable[[str], np.ndarray]
    ):
        self.identity = {"version": CACHE_VERSION, **identity}
        self.dir = Path(root) / kind / stable_hash(self.identity)
        self.known_file = Path(root) / "fingerprints.json"
        self.compute = compute
        self.meta_file = self.dir / "cache.json"
        self.scheme = SCHEME
        if self.meta_file.exists():
            import json

            from ..identity import artefact_scheme

            try:
                self.scheme = artefact_scheme(json.loads(self.meta_file.read_text()).get("fingerprints"))
            except ValueError:  # unreadable record (JSON): only a cache; rewritten by build()
                self.meta_file.unlink(missing_ok=True)

    def path_for(self, path: str) -> Path:
        return self.dir / f"{clip_key(path, scheme=self.scheme)}.npy"

    def build(
        self, paths: Sequence[str], workers: int | None = None, progress: Callable[[int, int], None] | None = None
    ) -> tuple[list[np.ndarray | None], list[tuple[str, str]]]:
        """Compute missing clips (threads: decode, resampling and the STFT release the GIL).

        Returns (memmaps in ``paths`` order, None where a clip failed; failures [(path, problem)]).
        """
        import json

        from ..io import atomic_write, atomic_write_text

        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.meta_file.exists():
            atomic_write_text(
                self.meta_file, json.dumps({**self.identity, "fingerprints": self.scheme}, indent=2, default=str)
            )
        from ..identity import identify_many, load_known, save_known

        failures: dict[int, str] = {}
        targets: list[Path | None] = []
        known = load_known(self.known_file)
        ids = identify_many(list(paths), known, workers, self.scheme)
        for i, r in enumerate(ids):
            if isinstance(r, AudioError):  # missing or unreadable: a bad file like any other
                failures[i] = (
                    r.problem if r.problem.startswith("cannot read file") else f"cannot read file: {r.problem}"
                )
                targets.append(None)
            else:
                targets.append(self.dir / f"{r[1]}.npy")
        fresh = [r for r in ids if not isinstance(r, AudioError) and r[0] not in known]
        if fresh:
            save_known(self.known_file, [*known.items(), *fresh])
        first: dict[Path, int] = {}  # the same audio under two names is computed once
        for i, t in enumerate(targets):
            if t is not None and not t.exists():
                first.setdefault(t, i)
        todo = list(first.values())
        dup_failures: dict[Path, list[int]] = {}
        for i, t in enumerate(targets):
            if t in first and first[t] != i:
                dup_failures.setdefault(t, []).append(i)
        done = len(paths) - len(todo)
        if progress:
            progress(done, len(paths))

        def work(i: int):
            try:
                arr = self.compute(paths[i])
                atomic_write(targets[i], lambda fh: np.save(fh, arr))
                return i, None
            except AudioError as exc:
                return i, exc.problem

        if todo:
            with ThreadPoolExecutor(max(1, workers or os.cpu_count() or 1)) as pool:
                for i, problem in pool.map(work, todo):
                    if problem is not None:
                        for j in (i, *dup_failures.get(targets[i], [])):
                            failures[j] = problem
                    done += 1
                    if progress:
                        progress(done, len(paths))
        arrays = [None if i in failures else np.load(t, mmap_mode="r") for i, t in enumerate(targets)]
        return arrays, [(paths[i], failures[i]) for i in sorted(failures)]


def decode_for_training(path: str, sample_rate: int, audio_cfg: AudioConfig, min_s: float) -> np.ndarray:
    """The one ingestion path (embedkit.audio.decoding.load) with a minimum duration: clips shorter than
    ``min_s`` (the training crop / evaluation segment) raise AudioError instead of being padded."""
    from ..audio import decoding as audio

    # Padding notes are collected, not warned: warnings from worker threads are not thread-safe
    # to silence, and loop-padding a 10 s clip to the canonical 30 s is the configured policy.
    return audio.load(path, sample_rate, audio_cfg, min_duration_s=min_s, notes=[])


def logmel_cache(root, feat: FeatureConfig, audio_cfg: AudioConfig, min_s: float) -> ClipCache:
    """Clean clip spectrograms, float16 [n_mels, T] (half the disk and page cache of float32;
    the dB values need ~3 significant digits, float16 keeps them to within 0.03 dB at 0..-100)."""

    def compute(path: str) -> np.ndarray:
        y = decode_for_training(path, feat.sample_rate, audio_cfg, min_s)
        return logmel(y, feat).astype(np.float16)

    return ClipCache(
        root, "cnn-logmel", {"features": asdict(feat), "audio": asdict(audio_cfg), "min_s": min_s}, compute
    )


def wave_cache(root, sample_rate: int, audio_cfg: AudioConfig, min_s: float) -> ClipCache:
    """Decoded clips, float32 [N] at ``sample_rate`` (for on-the-fly waveform augmentation and
    fine-tuning; float32 because pretrained front ends are sensitive to input precision)."""

    def compute(path: str) -> np.ndarray:
        return decode_for_training(path, sample_rate, audio_cfg, min_s).astype(np.float32)

    return ClipCache(
        root, "cnn-wave", {"sample_rate": sample_rate, "audio": asdict(audio_cfg), "min_s": min_s}, compute
    )


def raise_failures(failures: list[tuple[str, str]], skip_bad: bool) -> None:
    """Unusable clips stop the run with one line (or are skipped with ``skip_bad``)."""
    if failures and not skip_bad:
        path, problem = failures[0]
        more = (
            f" (and {len(failures) - 1} more; --skip-bad drops them)" if len(failures) > 1 else " (--skip-bad drops it)"
        )
        raise DatasetError(f"{path}: {problem}{more}")


# ---------------------------------------------------------------------------------------------
# Normalisation (fitted on the training part only)


@dataclass
class Normalizer:
    """``standard``: per-mel-band mean/std over every frame of the training clips (fitted);
    ``minmax``: each example scaled to [0, 1] on its own (nothing fitted); ``none``."""

    mode: str = "standard"
    mean: list[float] | None = None  # [n_mels]
    std: list[float] | None = None

    def __post_init__(self):
        if self.mode not in ("standard", "minmax", "none"):
            raise ConfigError(f"normalize must be standard, minmax or none, got {self.mode!r}", field="normalize")

    def fit(self, specs: Sequence[np.ndarray]) -> "Normalizer":
        """specs: training clips [M, T] (any float dtype). float64 accumulators: sums over
        millions of frames lose precision in float32."""
        if self.mode != "standard":
            return self
        if not specs:
            raise DatasetError("cannot fit normalisation: no training clips")
        m = specs[0].shape[0]
        s1, s2, n = np.zeros(m), np.zeros(m), 0
        for s in specs:
            a = np.asarray(s, dtype=np.float64)
            s1 += a.sum(axis=1)
            s2 += np.square(a).sum(axis=1)
            n += a.shape[1]
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean**2, 0.0))
        self.mean, self.std = mean.tolist(), np.maximum(std, 1e-3).tolist()
        return self

    def __call__(self, x):
        """x: torch [B, M, T] -> normalised float32 (new tensor)."""
        if self.mode == "none":
            return x.clone()
        return self.module().to(x.device)(x)

    def module(self):
        """The same normalisation as a torch module (buffers, no Python state): what the CNN
        Tagger's torch graph and the ONNX export run."""
        import torch
        from torch import nn

        if self.mode == "standard" and self.mean is None:
            raise RuntimeError("Normalizer.fit was not called")
        mode, mean, std = self.mode, self.mean, self.std

        class Normalize(nn.Module):
            def __init__(self):
                super().__init__()
                if mode == "standard":
                    self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[:, None])
                    self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[:, None])

            def forward(self, x):
                if mode == "standard":
                    return (x - self.mean) / self.std
                if mode == "minmax":
                    lo = x.amin(dim=(-2, -1), keepdim=True)
                    hi = x.amax(dim=(-2, -1), keepdim=True)
                    return (x - lo) / (hi - lo).clamp(min=1e-6)
                return x

        return Normalize().eval()

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "mean": self.mean, "std": self.std}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Normalizer":
        return cls(d["mode"], d.get("mean"), d.get("std"))
