"""Training loop shared by the scratch CNN and fine-tuning, and ``train_cnn`` (the scratch CNN).

Read ``fit_fold`` top to bottom: build the model, resume from the fold's checkpoint if there is
one, then per epoch: train on crops (prefetched in a thread), validate on fixed segments with
the track vote, checkpoint atomically, stop early when the validation loss has not improved
for ``patience`` epochs, and finally restore the best epoch's weights.

Exact resume: an epoch's batches are a pure function of (seed, fold, epoch) (see data.py);
the model, optimizer, early-stopping state and the global torch / numpy / python RNG states
(dropout draws from torch's) are saved after every epoch and restored on resume. Given the
same thread count, the resumed run's weights equal the uninterrupted run's bit for bit.

Run directory ``runs/<run-id>/``::

    run.json                  what the run is (identity: every config + the dataset); resume checks it
    checkpoints/<fold>.pt     last finished epoch of an unfinished fold (removed when the fold ends)
    checkpoints/<fold>.done.pt test predictions of a finished fold (a resumed run skips the fold)
    models/<fold>.pt          each fold's best network with its configs (``load_model`` rebuilds it)
    model.pt                  the first fold's model (the only one for holdout / split)
    metrics.json              written last: the run is complete once it exists
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from ..config import AudioConfig
from ..errors import ConfigMismatchError, DatasetError, EmbedkitError
from .augment import AugmentConfig
from .data import Clips, CropConfig, Prefetch, attach_augmentation, eval_batches, n_batches, train_batches
from .features import FeatureConfig, Normalizer
from .runs import (
    cache_progress,
    checkpoint_identity,
    choose_protocol,
    dataset_fingerprint,
    drop_failed,
    finish_run,
    inference_ms_per_track,
    inference_note,
    open_run_dir,
    plain,
    set_threads,
    training_process_settings,
)

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data-sampling settings (stored in run.json and every model file)."""

    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    lr_schedule: str = "constant"  # or "cosine": each group's rate x (1 + cos(pi * epoch / epochs)) / 2
    weight_decay: float = 0.0
    patience: int = 10  # epochs without a better validation loss before stopping
    val_size: float = 0.15  # fraction of each training part held out for early stopping
    crop: str = "random"  # "random" 3-5 s crop per clip per epoch, or "fixed" 6 x 5 s segments
    crop_min_s: float = 3.0
    crop_max_s: float = 5.0
    crops_per_clip: int = 1  # random crops of each clip per epoch (more steps per validation)
    segment_s: float = 5.0  # evaluation segments (and the fixed training segments)
    normalize: str = "standard"
    seed: int = 0

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.batch_size >= 2, "--batch-size must be >= 2 (batch norm needs two examples)"),
            (self.lr > 0, "learning rate must be positive"),
            (self.patience >= 1, "--patience must be >= 1"),
            (0 <= self.val_size < 1, "--val-size must be in [0, 1)"),
            (self.crop in ("random", "fixed"), f"--crop must be random or fixed, got {self.crop!r}"),
            (0 < self.crop_min_s <= self.crop_max_s, "crop lengths need 0 < min <= max"),
            (self.crops_per_clip >= 1, "--crops-per-clip must be >= 1"),
            (self.weight_decay >= 0, "--weight-decay must be >= 0"),
            (self.lr_schedule in ("constant", "cosine"), f"--lr-schedule must be constant or cosine, got {self.lr_schedule!r}"),
            (self.segment_s > 0, "--segment must be positive"),
            (self.normalize in ("standard", "minmax", "none"), f"unknown normalisation {self.normalize!r}; use standard, minmax or none"),
        ]
        for ok, msg in checks:
            if not ok:
                raise DatasetError(msg)

    @property
    def min_clip_s(self) -> float:
        """Shortest usable clip: it must hold the longest crop and one evaluation segment."""
        return max(self.segment_s, self.crop_max_s if self.crop == "random" else self.segment_s)

    def check_clip_length(self, clip_s: float | None) -> None:
        """Every clip is brought to ``clip_s``; refuse lengths no crop or segment fits in."""
        if clip_s is not None and clip_s < self.min_clip_s:
            raise DatasetError(f"--clip {clip_s:g} s is shorter than the {self.min_clip_s:g} s a training crop / evaluation segment needs")

    def lr_factor(self, epoch: int) -> float:
        """Multiplier of every parameter group's base rate in 0-based ``epoch``. A pure function
        of the epoch, so a resumed run needs no scheduler state."""
        if self.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        return 1.0

    def crop_config(self) -> CropConfig:
        return CropConfig(self.batch_size, self.crop, self.crop_min_s, self.crop_max_s, self.segment_s, self.crops_per_clip)


# ---------------------------------------------------------------------------------------------
# The loop


class Task:
    """What differs between the scratch CNN and fine-tuning. ``clips`` feeds the sampler."""

    clips: Clips
    aug: AugmentConfig

    def prepare_fold(self, train_idx: np.ndarray) -> None:
        """Fit whatever is fitted on the training part (normalisation)."""

    def build_model(self):
        raise NotImplementedError

    def phase(self, epoch: int) -> str:
        return "train"

    def make_optimizer(self, model, phase: str):
        raise NotImplementedError

    def set_mode(self, model, phase: str) -> None:
        model.train()

    def model_payload(self, model, fold: str) -> dict[str, Any]:
        """Everything the model file needs besides the weights."""
        raise NotImplementedError


@dataclass
class FoldFit:
    model: Any
    history: list[dict[str, Any]]
    best_epoch: int
    seconds: float


def soft_cross_entropy(logits, targets):
    """Cross-entropy against soft targets [B, C] (one-hot, or mixup's convex combinations)."""
    import torch

    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


def train_epoch(model, opt, batches, on_step: Callable[[int, float], None] | None = None) -> dict[str, float]:
    """One pass over ``batches`` of (x, soft targets). Returns mean loss, accuracy (against the
    dominant target) and the seconds spent in forward/backward/step (in all, and per step)."""
    total, correct, n, step_s = 0.0, 0, 0, []
    for step, (x, t) in enumerate(batches):
        t0 = time.perf_counter()
        logits = model(x)
        loss = soft_cross_entropy(logits, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_s.append(time.perf_counter() - t0)
        total += float(loss.detach()) * len(x)
        correct += int((logits.argmax(1) == t.argmax(1)).sum())
        n += len(x)
        if on_step:
            on_step(step + 1, total / n)
    if n == 0:
        raise DatasetError("no training batches (empty training part)")
    return {"loss": total / n, "acc": correct / n, "compute_s": sum(step_s), "step_s": step_s}


def predict(model, clips: Clips, idx: Sequence[int], segment_s: float, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, float]:
    """Fixed-segment class probabilities [S, C], the clip index of each segment [S], and the
    mean segment cross-entropy (the validation loss)."""
    import torch

    model.eval()
    probs, owners, loss, n = [], [], 0.0, 0
    with torch.inference_mode():
        for x, owner in eval_batches(clips, idx, segment_s, batch_size):
            logits = model(x)
            y = torch.as_tensor(clips.labels[owner])
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            n += len(owner)
            probs.append(torch.softmax(logits, dim=1).double().numpy())
            owners.append(owner)
    if n == 0:
        raise DatasetError("no evaluation segments")
    return np.concatenate(probs), np.concatenate(owners), loss / n


def track_accuracy(proba: np.ndarray, owners: np.ndarray, labels: np.ndarray) -> float:
    """Mean-probability track vote accuracy."""
    from ..evaluate import aggregate

    ids, mean, _ = aggregate(owners, proba)
    return float((mean.argmax(1) == labels[ids]).mean())


def _rng_states() -> dict[str, Any]:
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
    }


def _set_rng_states(s: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(s["torch"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((s["python_version"], tuple(s["python"]), None))


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    from ..io import atomic_write

    atomic_write(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(path: Path, identity: str) -> dict[str, Any]:
    """A fold checkpoint (``<fold>.pt`` or ``<fold>.done.pt``) of this run's configuration."""
    import torch

    try:
        c = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EmbedkitError(f"{path}: unreadable checkpoint ({type(exc).__name__}); delete it to redo the fold") from None
    if not isinstance(c, dict) or c.get("identity") != identity:
        raise ConfigMismatchError(f"{path}: checkpoint from a different configuration; resume with the original options and data, or start a new run")
    return c


def fit_fold(task: Task, fold_index: int, fold: str, train_idx: np.ndarray, val_idx: np.ndarray, cfg: TrainConfig, ckpt_dir: Path, identity: str, progress: Progress | None = None) -> FoldFit:
    """Train one fold with early stopping, checkpointing after every epoch (see module doc)."""
    import torch

    ckpt_path = ckpt_dir / f"{fold}.pt"
    torch.manual_seed(cfg.seed * 1009 + fold_index)  # same init for the same (seed, fold)
    model = task.build_model()
    st = {"epoch": 0, "history": [], "best_loss": float("inf"), "best_epoch": -1, "bad": 0, "stopped": False}
    best_state, opt, opt_phase = None, None, None
    if ckpt_path.exists():
        c = load_checkpoint(ckpt_path, identity)
        model.load_state_dict(c["model"])
        st, best_state = c["state"], c["best_state"]
        if c["phase"] == task.phase(st["epoch"]):
            opt_phase = c["phase"]
            opt = task.make_optimizer(model, opt_phase)
            opt.load_state_dict(c["optimizer"])
        _set_rng_states(c["rng"])
    crop = cfg.crop_config()
    steps = n_batches(task.clips, train_idx, crop)
    for epoch in range(st["epoch"], cfg.epochs):
        if st["stopped"]:
            break
        phase = task.phase(epoch)
        if phase != opt_phase:  # a new phase (e.g. unfreezing) starts with a fresh optimizer
            opt, opt_phase = task.make_optimizer(model, phase), phase
        task.set_mode(model, phase)
        for g in opt.param_groups:
            g.setdefault("base_lr", g["lr"])  # kept in the optimizer's state_dict, so resume sees it
            g["lr"] = g["base_lr"] * cfg.lr_factor(epoch)
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, fold_index, epoch])
        batches = Prefetch(train_batches(task.clips, train_idx, crop, task.aug, rng))

        def on_step(step, loss, epoch=epoch):
            if progress:
                progress({"event": "step", "fold": fold, "fold_index": fold_index, "epoch": epoch + 1, "epochs": cfg.epochs, "step": step, "steps": steps, "loss": loss})

        tr = train_epoch(model, opt, batches, on_step)
        rec: dict[str, Any] = {"epoch": epoch + 1, "phase": phase, "lr": opt.param_groups[0]["lr"], "train_loss": tr["loss"], "train_acc": tr["acc"]}
        if len(val_idx):
            proba, owners, vloss = predict(model, task.clips, val_idx, cfg.segment_s)
            rec.update(val_loss=vloss, val_acc=track_accuracy(proba, owners, task.clips.labels), val_segment_acc=float((proba.argmax(1) == task.clips.labels[owners]).mean()))
            monitor = vloss
        else:  # no validation part: keep the last epoch, never stop early
            rec.update(val_loss=None, val_acc=None)
            monitor = -float(epoch)
        rec.update(seconds=time.perf_counter() - t0, compute_s=tr["compute_s"], data_busy_s=batches.busy_s, data_wait_s=batches.wait_s)
        st["history"].append(rec)
        if monitor < st["best_loss"]:
            st.update(best_loss=monitor, best_epoch=epoch + 1, bad=0)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            st["bad"] += 1
            st["stopped"] = st["bad"] >= cfg.patience
        st["epoch"] = epoch + 1
        ckpt = {"identity": identity, "model": model.state_dict(), "optimizer": opt.state_dict(), "phase": phase, "state": st, "best_state": best_state, "rng": _rng_states()}
        _atomic_torch_save(ckpt, ckpt_path)
        if progress:
            progress({"event": "epoch", "fold": fold, "fold_index": fold_index, "epochs": cfg.epochs, **rec, "best_epoch": st["best_epoch"], "stopped": st["stopped"]})
    if best_state is not None:
        model.load_state_dict(best_state)
    return FoldFit(model, st["history"], st["best_epoch"], sum(r["seconds"] for r in st["history"]))  # resumed epochs included


# ---------------------------------------------------------------------------------------------
# Folds


def check_folds(folds, val_size: float) -> None:
    for f in folds:
        if len(f.train) < 2:
            raise DatasetError(f"{f.name}: {len(f.train)} training track(s); too few clips for this protocol")
        if val_size > 0 and not f.val:
            raise DatasetError(f"{f.name}: no validation tracks for early stopping; use more clips or --val-size 0")


def run_folds(task: Task, tracks: pd.DataFrame, folds, cfg: TrainConfig, run_dir: Path, identity: str, labels: list[str], progress: Progress | None = None):
    """Train every fold (skipping finished ones), evaluate on its test part with the track
    vote, write each fold's model. Returns (Evaluation, learning curves, training seconds)."""
    import torch

    from ..evaluate import Evaluation

    pos = {t: i for i, t in enumerate(tracks["track_id"])}
    track_labels = dict(zip(tracks["track_id"], tracks["label"]))
    paths = dict(zip(tracks["track_id"], tracks["path"]))
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "models").mkdir(exist_ok=True)
    ev = Evaluation(labels)
    curves, seconds = {}, 0.0
    if progress:  # every event says how many folds there are (for the progress bar's total)
        progress = (lambda report: lambda e: report({**e, "n_folds": len(folds)}))(progress)
    for fi, f in enumerate(folds):
        done_path = ckpt_dir / f"{f.name}.done.pt"
        if done_path.exists():
            d = load_checkpoint(done_path, identity)
        else:
            train_idx = np.array([pos[t] for t in f.train])
            val_idx = np.array([pos[t] for t in f.val], dtype=np.int64)
            test_idx = np.array([pos[t] for t in f.test])
            task.prepare_fold(train_idx)
            fit = fit_fold(task, fi, f.name, train_idx, val_idx, cfg, ckpt_dir, identity, progress)
            proba, owners, test_loss = predict(fit.model, task.clips, test_idx, cfg.segment_s)
            from .model import save_model

            payload = task.model_payload(fit.model, f.name)
            save_model(run_dir / "models" / f"{f.name}.pt", payload)
            d = {
                "identity": identity,
                "proba": torch.from_numpy(proba),
                "owners": torch.from_numpy(owners),
                "history": fit.history,
                "best_epoch": fit.best_epoch,
                "seconds": fit.seconds,
                "test_loss": test_loss,
                "n_train": len(train_idx),
                "n_val": len(val_idx),
            }
            _atomic_torch_save(d, done_path)
            (ckpt_dir / f"{f.name}.pt").unlink(missing_ok=True)
        owner_ids = tracks["track_id"].to_numpy()[d["owners"].numpy()]
        rec = ev.add_fold(f.name, owner_ids, d["proba"].numpy(), track_labels, paths, extra={"best_epoch": d["best_epoch"], "epochs_run": len(d["history"]), "train_seconds": d["seconds"], "n_train_tracks": d["n_train"], "n_val_tracks": d["n_val"]})
        curves[f.name] = d["history"]
        seconds += d["seconds"]
        if progress:
            progress({"event": "fold_done", "fold": f.name, "fold_index": fi, "n_folds": len(folds), **rec})
    return ev, curves, seconds


# ---------------------------------------------------------------------------------------------
# The scratch CNN


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]


class CNNTask(Task):
    def __init__(self, clips: Clips, model_cfg, cfg: TrainConfig, aug: AugmentConfig, feat: FeatureConfig, audio_cfg: AudioConfig, labels: list[str]):
        self.clips, self.model_cfg, self.cfg, self.aug, self.feat, self.audio_cfg, self.labels = clips, model_cfg, cfg, aug, feat, audio_cfg, labels
        self.normalizer: Normalizer | None = None

    def prepare_fold(self, train_idx):
        # Normalisation statistics come from the clean training part only (never val / test).
        self.normalizer = Normalizer(self.cfg.normalize).fit([self.clips.clean[i] for i in train_idx])
        self.clips.normalize = self.normalizer

    def build_model(self):
        from .model import build_cnn

        return build_cnn(self.model_cfg)

    def make_optimizer(self, model, phase):
        import torch

        return torch.optim.Adam(model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def model_payload(self, model, fold):
        from ..io import versions

        return {
            "kind": "cnn",
            "model_config": self.model_cfg.to_dict(),
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "labels": list(self.labels),
            "features": asdict(self.feat),
            "audio": asdict(self.audio_cfg),
            "normalizer": self.normalizer.to_dict(),
            "segment_s": self.cfg.segment_s,
            "train_config": asdict(self.cfg),
            "augment": plain(self.aug.to_dict()),
            "fold": fold,
            "versions": {k: str(v) for k, v in versions().items()},  # plain str: weights_only loading
        }


def run_name(base: str, aug: AugmentConfig) -> str:
    if not aug.enabled:
        return base
    from .augment import ALL_AUGS

    return f"{base}+aug" if set(aug.enabled) == set(ALL_AUGS) else f"{base}+{'+'.join(aug.enabled)}"


@training_process_settings
def train_cnn(
    tracks: pd.DataFrame,
    *,
    cv: int | None = None,
    test_size: float = 0.2,
    train: TrainConfig = TrainConfig(),
    channels: tuple[int, ...] = (32, 64, 128, 128),
    dropout: float = 0.5,
    block_order: str = "conv-pool-bn-relu",
    features: FeatureConfig = FeatureConfig(),
    audio_cfg: AudioConfig = AudioConfig(),
    augment: AugmentConfig = AugmentConfig(),
    runs_dir: str | os.PathLike = "runs",
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    cache: str | os.PathLike = "cache",
    threads: int | None = None,
    workers: int | None = None,
    skip_bad: bool = False,
    name: str | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train and evaluate the scratch CNN on a track table (see module doc for the run layout)."""
    from ..evaluate import dataset_summary, make_folds, protocol_dict
    from .features import logmel, logmel_cache, logmel_module
    from .model import CNNConfig, build_cnn, count_macs, n_params

    train.validate()
    train.check_clip_length(audio_cfg.clip_s)
    n_threads = set_threads(threads)
    protocol = choose_protocol(tracks, cv, test_size)
    make_folds(tracks, protocol, cv or 5, test_size, train.seed, train.val_size)  # fail fast on the protocol
    labels = sorted(tracks["label"].unique())
    model_cfg = CNNConfig(n_classes=len(labels), n_mels=features.n_mels, channels=tuple(channels), dropout=dropout, block_order=block_order)
    try:
        build_cnn(model_cfg)  # validates the architecture before any decoding
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    name = name or run_name("cnn-scratch", augment)
    identity = {
        "kind": "cnn", "dataset": dataset_fingerprint(tracks), "protocol": protocol, "cv": cv, "test_size": test_size,
        "train": asdict(train), "model": model_cfg.to_dict(), "features": asdict(features), "audio": asdict(audio_cfg),
        "augment": augment.to_dict(), "skip_bad": skip_bad,
    }  # fmt: skip
    run_dir = open_run_dir(runs_dir, run_dir, resume, "cnn", name, identity, progress)
    progress_for = cache_progress(progress)
    t_cache = time.perf_counter()
    min_s = train.min_clip_s
    clean, failures = logmel_cache(cache, features, audio_cfg, min_s).build(tracks["path"].tolist(), workers, progress_for("log-mel"))
    tracks, clean, skipped = drop_failed(tracks, clean, failures, skip_bad)
    ident_hash = checkpoint_identity(identity, tracks)
    folds = make_folds(tracks, protocol, cv or 5, test_size, train.seed, train.val_size)
    check_folds(folds, train.val_size)
    label_idx = {l: i for i, l in enumerate(labels)}
    clips = Clips(clean=clean, labels=np.array([label_idx[l] for l in tracks["label"]]), n_classes=len(labels), hop=features.hop_length, sr=features.sample_rate, normalize=None)
    if augment.waveform and augment.wave_mode == "online":
        front = logmel_module(features)
        clips.featurize = lambda y: front(y)
    attach_augmentation(
        clips, tracks, folds, cache, audio_cfg, min_s, augment, train.seed,
        represent=lambda y: logmel(y, features).astype(np.float16), represent_id={"logmel": asdict(features), "sample_rate": features.sample_rate},
        workers=workers, cache_progress=progress_for,
    )  # fmt: skip
    cache_seconds = time.perf_counter() - t_cache

    task = CNNTask(clips, model_cfg, train, augment, features, audio_cfg, labels)
    ev, curves, train_seconds = run_folds(task, tracks, folds, train, run_dir, ident_hash, labels, progress)

    # Inference cost from the file: decode + log-mel + 6 segments + forward + vote.
    from .model import load_model

    model = load_model(run_dir / "models" / f"{folds[0].name}.pt")
    infer_ms = inference_ms_per_track(model, tracks, folds[0].test)
    n_frames = features.n_frames(int(round(train.segment_s * features.sample_rate)))
    macs = count_macs(model.net, (1, features.n_mels, n_frames))
    n_segments = sum(len(segment_starts_for(c, features, train.segment_s)) for c in clean)
    metrics = {
        "run_id": run_dir.name, "kind": "cnn", "name": name, "backbone": "logmel", "head": "cnn",
        "protocol": {**protocol_dict(protocol, cv or 5, train.seed, test_size, tracks), "val_size": train.val_size},
        "dataset": dataset_summary(tracks, n_segments),
        "train_seconds": train_seconds, "cache_seconds": cache_seconds, "inference_ms_per_track": infer_ms,
        "inference_note": inference_note("decode, log-mel", audio_cfg.clip_s, train.segment_s),
        "n_params": n_params(model.net), "macs_per_segment": macs, "threads": n_threads,
        "spec": {"features": asdict(features)},
        "preprocess": {"audio": asdict(audio_cfg), "segments": {"segment_s": train.segment_s, "hop_s": train.segment_s}},
        "config": {"train": asdict(train), "model": model_cfg.to_dict(), "augment": augment.to_dict()},
        "skipped": skipped,
    }  # fmt: skip
    return TrainResult(run_dir, finish_run(run_dir, ev, curves, metrics, folds[0].name))


def segment_starts_for(spec: np.ndarray, feat: FeatureConfig, segment_s: float) -> np.ndarray:
    from .data import segment_starts

    return segment_starts(spec.shape[-1], feat.hop_length, feat.sample_rate, segment_s)[0]
