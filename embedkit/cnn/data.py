"""Training batches from cached clips: random (or fixed) crops, augmentation, prefetching.

One representation-agnostic sampler serves both trainers: ``Clips.clean`` holds one array per
clip whose last axis is time -- log-mel frames [M, T] for the scratch CNN (hop 512) or the
waveform [N] for fine-tuning (hop 1). Crop lengths are drawn in seconds and converted with the
clip's hop, so 5 s is 431 frames or 80,000 samples at 16 kHz.

Determinism: every draw of an epoch comes from one Generator the trainer derives from
(seed, fold, epoch), consumed by a single producer thread in a fixed order. An epoch's batches
are therefore a pure function of that triple, which is half of what makes resume exact.
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..audio.segments import window_starts
from ..config import AudioConfig, stable_hash
from .augment import AugmentConfig, augment_wave, draw_params, mixup, spec_augment


def segment_starts(n_units: int, hop: int, sr: int, segment_s: float) -> tuple[np.ndarray, int]:
    """Fixed, non-overlapping segments over a clip with ``n_units`` time units.

    Uses the project's one windowing function on the sample axis (window k starts at sample
    round(k * segment_s * sr)) and maps starts to units: frame round(start / hop) for
    spectrograms (within half a hop, 5.8 ms at 44.1 kHz / 512). Returns (starts [K], length n):
    n = 1 + L // hop frames (431 for 5 s at 44.1 kHz) or L samples when hop is 1.
    """
    length = int(round(segment_s * sr))
    n = units_for(length, hop)
    n_samples = n_units * hop  # upper bound of the clip's samples for a centred STFT
    starts = np.round(window_starts(n_samples, sr, segment_s, segment_s) / hop).astype(np.int64)
    starts = np.minimum(starts, n_units - n)
    return starts[starts >= 0], n


def units_for(n_samples: int, hop: int) -> int:
    return n_samples if hop == 1 else 1 + n_samples // hop


@dataclass
class Clips:
    """Cached training material, index-aligned with the track table.

    clean: per clip, array [..., T] (memmap), the clean representation used for evaluation.
    hop / sr: samples per time unit of ``clean`` and the sample rate.
    variants: pool mode, per clip a list of pre-augmented arrays like ``clean``.
    waves / featurize: online mode, per clip the waveform at ``sr`` and the function turning a
        batch of waveform crops [B, N] (torch) into the representation of ``clean``
        (None: ``clean`` already is the waveform).
    normalize: torch [B, ..., T] -> normalised float32 tensor (fitted on training clips).
    """

    clean: Sequence[np.ndarray]
    labels: np.ndarray  # int64 [n_clips]
    n_classes: int
    hop: int
    sr: int
    normalize: Callable
    variants: Sequence[Sequence[np.ndarray]] | None = None
    waves: Sequence[np.ndarray] | None = None
    featurize: Callable | None = None
    spectrogram: bool = True  # SpecAugment needs [B, M, T]


@dataclass
class CropConfig:
    batch_size: int = 16
    crop: str = "random"  # "random": crops_per_clip crops per clip per epoch; "fixed": every fixed segment
    crop_min_s: float = 3.0
    crop_max_s: float = 5.0
    segment_s: float = 5.0
    crops_per_clip: int = 1


def _chunks(order: np.ndarray, size: int) -> list[np.ndarray]:
    parts = [order[i : i + size] for i in range(0, len(order), size)]
    if len(parts) > 1 and len(parts[-1]) == 1:  # batch norm cannot train on a batch of one
        parts[-2] = np.concatenate(parts[-2:])
        parts.pop()
    return parts


def n_batches(clips: Clips, idx: Sequence[int], crop: CropConfig) -> int:
    """Batches per epoch (for progress bars and ETA)."""
    if crop.crop == "fixed":
        n = sum(len(segment_starts(clips.clean[i].shape[-1], clips.hop, clips.sr, crop.segment_s)[0]) for i in idx)
    else:
        n = len(idx) * crop.crops_per_clip
    return len(_chunks(np.arange(n), crop.batch_size))


def train_batches(
    clips: Clips, idx: Sequence[int], crop: CropConfig, aug: AugmentConfig, rng: np.random.Generator
) -> Iterator[tuple[Any, Any]]:
    """One epoch of (x [B, ...], soft targets [B, C]) float32 torch tensors."""
    import torch

    idx = np.asarray(idx, dtype=np.int64)
    if crop.crop == "fixed":
        items = [
            (int(i), int(s))
            for i in idx
            for s in segment_starts(clips.clean[i].shape[-1], clips.hop, clips.sr, crop.segment_s)[0]
        ]
    else:
        items = [(int(i), -1) for i in idx] * crop.crops_per_clip  # each draws its own crop
    online = aug.waveform and aug.wave_mode == "online"
    pool = aug.waveform and aug.wave_mode == "pool" and clips.variants is not None
    eye = torch.eye(clips.n_classes)
    for chunk in _chunks(rng.permutation(len(items)), crop.batch_size):
        seconds = crop.segment_s if crop.crop == "fixed" else float(rng.uniform(crop.crop_min_s, crop.crop_max_s))
        length = int(round(seconds * clips.sr))  # samples
        n = units_for(length, clips.hop)
        xs, ys = [], []
        for j in chunk:
            i, start = items[j]
            params = draw_params(aug, rng) if online else None
            if online:
                wave = clips.waves[i]
                src = min(len(wave), int(math.ceil(length * params.source_factor())))
                s0 = (
                    min(start * clips.hop, len(wave) - src) if start >= 0 else int(rng.integers(0, len(wave) - src + 1))
                )
                xs.append(
                    augment_wave(np.asarray(wave[s0 : s0 + src], dtype=np.float32), clips.sr, params, out_len=length)
                )
            else:
                arr = clips.clean[i]
                if pool:
                    v = int(rng.integers(0, len(clips.variants[i]) + 1))  # 0: the clean clip
                    arr = arr if v == 0 else clips.variants[i][v - 1]
                t_len = arr.shape[-1]
                s0 = min(start, t_len - n) if start >= 0 else int(rng.integers(0, t_len - n + 1))
                xs.append(np.asarray(arr[..., s0 : s0 + n], dtype=np.float32))
            ys.append(clips.labels[i])
        x = torch.from_numpy(np.stack(xs))
        if online and clips.featurize is not None:
            x = clips.featurize(x)
        x = clips.normalize(x)
        if aug.on("specaugment") and clips.spectrogram:
            spec_augment(x, aug, rng)
        t = eye[torch.as_tensor(np.asarray(ys, dtype=np.int64))]
        if aug.on("mixup"):
            x, t, _, _ = mixup(x, t, aug.mixup_alpha, rng)
        yield x, t


def eval_batches(
    clips: Clips, idx: Sequence[int], segment_s: float, batch_size: int = 32
) -> Iterator[tuple[Any, np.ndarray]]:
    """Fixed segments of the clean clips: (normalised x [B, ...], clip index [B])."""
    import torch

    items = []
    for i in idx:
        starts, n = segment_starts(clips.clean[i].shape[-1], clips.hop, clips.sr, segment_s)
        items += [(int(i), int(s), n) for s in starts]
    for b in range(0, len(items), batch_size):
        part = items[b : b + batch_size]
        x = torch.from_numpy(
            np.stack([np.asarray(clips.clean[i][..., s : s + n], dtype=np.float32) for i, s, n in part])
        )
        yield clips.normalize(x), np.array([i for i, _, _ in part])


class Prefetch:
    """Run a batch iterator in a background thread, ``depth`` batches ahead.

    Data preparation (memmap reads, augmentation, normalisation) then overlaps the training
    step, whose torch kernels release the GIL. A thread rather than DataLoader worker processes:
    on a 2-core laptop extra processes compete with the compute threads and must re-open the
    memmaps; one producer also keeps the draw order, hence determinism, trivially fixed.
    ``busy_s`` is the producer's working time, ``wait_s`` the consumer's time blocked on it.
    """

    _END = object()

    def __init__(self, it: Iterator, depth: int = 2):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.busy_s = 0.0
        self.wait_s = 0.0
        self._stop = threading.Event()
        self._it = it
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                t = time.perf_counter()
                try:
                    item = next(self._it)
                except StopIteration:
                    break
                self.busy_s += time.perf_counter() - t
                self._put(item)
        except BaseException as exc:  # re-raised in the consumer
            self._put(exc)
        self._put(self._END)

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        try:
            while True:
                t = time.perf_counter()
                item = self.q.get()
                self.wait_s += time.perf_counter() - t
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------
# Waveform augmentation material: on-the-fly waveforms or a pre-augmented pool


def build_pool(
    cache: str | os.PathLike,
    paths: Sequence[str],
    sample_rate: int,
    audio_cfg: AudioConfig,
    min_s: float,
    aug: AugmentConfig,
    seed: int,
    represent: Callable[[np.ndarray], np.ndarray],
    represent_id: dict[str, Any],
    workers: int | None = None,
    progress=None,
):
    """A small pool of pre-augmented variants per clip, ``represent(waveform)`` stacked
    [pool_size, ...] (float16 log-mel for the scratch CNN, float32 waveform for fine-tuning),
    cached like the clean clips and keyed by the waveform-augmentation settings and seed.
    Returns (per clip a list of variant arrays or None, failures)."""
    from .features import ClipCache, decode_for_training

    def compute(path: str) -> np.ndarray:
        y = decode_for_training(path, sample_rate, audio_cfg, min_s)
        base = int(stable_hash(os.path.abspath(path), 8), 16)
        return np.stack(
            [
                represent(augment_wave(y, sample_rate, draw_params(aug, np.random.default_rng([seed, base, v]))))
                for v in range(aug.pool_size)
            ]
        )

    ident = {
        "represent": represent_id,
        "sample_rate": sample_rate,
        "audio": asdict(audio_cfg),
        "min_s": min_s,
        "augment": aug.wave_identity(),
        "seed": seed,
    }
    arrays, failures = ClipCache(cache, "cnn-pool", ident, compute).build(paths, workers, progress)
    return [None if a is None else [a[v] for v in range(len(a))] for a in arrays], failures


def attach_augmentation(
    clips: Clips,
    tracks,
    folds,
    cache,
    audio_cfg: AudioConfig,
    min_s: float,
    aug: AugmentConfig,
    seed: int,
    represent,
    represent_id,
    workers=None,
    cache_progress=None,
) -> None:
    """Give the sampler what waveform augmentation needs: the waveforms (online mode) or the
    pre-augmented pool of every clip that is in some training part (pool mode)."""
    from .features import raise_failures, wave_cache

    paths = tracks["path"].tolist()
    if not aug.waveform:
        return
    if aug.wave_mode == "online":
        if clips.waves is None:
            waves, failures = wave_cache(cache, clips.sr, audio_cfg, min_s).build(
                paths, workers, cache_progress("waveforms") if cache_progress else None
            )
            raise_failures(failures, False)
            clips.waves = waves
        return
    in_train = sorted({t for f in folds for t in f.train})
    pos = {t: i for i, t in enumerate(tracks["track_id"])}
    variants: list = [None] * len(tracks)
    arrays, failures = build_pool(
        cache,
        [paths[pos[t]] for t in in_train],
        clips.sr,
        audio_cfg,
        min_s,
        aug,
        seed,
        represent,
        represent_id,
        workers,
        cache_progress("augmented pool") if cache_progress else None,
    )
    raise_failures(failures, False)
    for t, a in zip(in_train, arrays):
        variants[pos[t]] = a
    clips.variants = variants
