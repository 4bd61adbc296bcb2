"""The training engine of the scratch CNN and fine-tuning: one run from a track table to a
finished run directory.

``train_run(task, tracks, ...)`` reads top to bottom: validate every config, choose the protocol
and make the folds (or take the pipeline's), open (or resume) the run directory, cache the
clean clips (skipping bad files with ``skip_bad``), attach augmentation material, train every
fold (``run_folds`` -> ``fit_fold``), time inference from the audio file, and write
``metrics.json`` last. A :class:`Task` says what differs: the cached representation, the
network, its optimizer phases and its model file (``train.CNNTask``, ``finetune.FinetuneTask``).

After cross-validation, ``fit_final`` trains the deployable model on every labelled track
(heads do the same in ``fit``). ``fit_fold``: build the model, resume from the fold's checkpoint if there is one, then per
epoch: train on crops (prefetched in a thread), validate on fixed segments with the track
vote, checkpoint atomically, stop early when the validation loss has not improved for
``patience`` epochs, and finally restore the best epoch's weights.

Exact resume: an epoch's batches are a pure function of (seed, fold, epoch) (see data.py);
the model, optimizer, early-stopping state and the global torch / numpy / python RNG states
(dropout draws from torch's) are saved after every epoch and restored on resume. Given the
same thread count, the resumed run's weights equal the uninterrupted run's bit for bit.

Run directory ``runs/<run-id>/``::

    run.json                  what the run is (identity: every config + the dataset); resume checks it
    checkpoints/<fold>.pt     last finished epoch of an unfinished fold (removed when the fold ends)
    checkpoints/<fold>.done.pt test predictions of a finished fold (a resumed run skips the fold)
    models/<fold>.pt          each fold's best network with its configs (``load_model`` rebuilds it)
    models/final.pt           after CV: one network trained on every labelled track for the
                              median of the folds' best epochs (``fit_final``; resumable too)
    model.pt                  the deployable model: models/final.pt after CV, the only fold's
                              model for holdout / split (metrics.json "deployed_model" says which)
    metrics.json              written last: the run is complete once it exists; its scores are
                              the folds' (the evaluated models/<fold>.pt)
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from ..config import AudioConfig
from ..errors import ConfigError, ConfigMismatchError, DatasetError, EmbedkitError
from .augment import AugmentConfig
from .data import Clips, CropConfig, Prefetch, eval_batches, n_batches, train_batches
from .runs import training_process_settings

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and data-sampling settings (stored in run.json and every model file)."""

    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    lr_schedule: str = "constant"  # "cosine": x (1 + cos(pi * epoch / epochs)) / 2; "onecycle": warm-up, then cosine
    weight_decay: float = 0.0
    label_smoothing: float = 0.0  # targets (1 - e) * target + e / n_classes (after mixup)
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
        """ConfigError naming the first bad field (the CLI shows it as its option)."""
        checks = [
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 2, "must be >= 2 (batch norm needs two examples)"),
            ("lr", self.lr > 0, "must be positive"),
            ("patience", self.patience >= 1, "must be >= 1"),
            ("val_size", 0 <= self.val_size < 1, "must be in [0, 1)"),
            ("crop", self.crop in ("random", "fixed"), f"must be random or fixed, got {self.crop!r}"),
            ("crop_min_s", 0 < self.crop_min_s <= self.crop_max_s, "must be > 0 and <= crop_max_s"),
            ("crops_per_clip", self.crops_per_clip >= 1, "must be >= 1"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            (
                "lr_schedule",
                self.lr_schedule in ("constant", "cosine", "onecycle"),
                f"must be constant, cosine or onecycle, got {self.lr_schedule!r}",
            ),
            ("segment_s", self.segment_s > 0, "must be positive"),
            (
                "normalize",
                self.normalize in ("standard", "minmax", "none"),
                f"must be standard, minmax or none, got {self.normalize!r}",
            ),
        ]
        for name, ok, problem in checks:
            if not ok:
                raise ConfigError(f"{name} {problem}", field=name)

    @property
    def min_clip_s(self) -> float:
        """Shortest usable clip: it must hold the longest crop and one evaluation segment."""
        return max(self.segment_s, self.crop_max_s if self.crop == "random" else self.segment_s)

    def check_clip_length(self, clip_s: float | None) -> None:
        """Every clip is brought to ``clip_s``; refuse lengths no crop or segment fits in."""
        if clip_s is not None and clip_s < self.min_clip_s:
            raise ConfigError(
                f"clip_s {clip_s:g} s is shorter than the {self.min_clip_s:g} s a training crop / evaluation segment needs",
                field="clip_s",
            )

    def lr_factor(self, epoch: int) -> float:
        """Multiplier of every parameter group's base rate in 0-based ``epoch``. A pure function
        of the epoch, so a resumed run needs no scheduler state."""
        if self.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * epoch / self.epochs))
        if self.lr_schedule == "onecycle":  # linear warm-up over the first 30 % from 1/10, then cosine
            warm = max(1, round(0.3 * self.epochs))
            if epoch < warm:
                return 0.1 + 0.9 * epoch / warm
            return 0.5 * (1.0 + math.cos(math.pi * (epoch - warm) / max(1, self.epochs - warm)))
        return 1.0

    def crop_config(self) -> CropConfig:
        return CropConfig(
            self.batch_size, self.crop, self.crop_min_s, self.crop_max_s, self.segment_s, self.crops_per_clip
        )


# ---------------------------------------------------------------------------------------------
# The loop


class Task:
    """What differs between the scratch CNN and fine-tuning; the engine does the rest.

    Built with its own configs; the engine then ``bind``s the run's configs and class names and,
    after caching, sets ``clips`` (what the sampler reads) before the folds train."""

    kind: str  # "cnn" | "finetune": run.json, metrics.json and the model file say which
    base_name: str  # default run name (augmentations are appended)
    cache_what: str  # what the clean cache holds (progress label)
    inference_steps: str  # what inference does before the network (metrics' inference note)
    sample_rate: int  # rate of the cached representation's waveform
    hop: int = 1  # samples per time unit of the cached representation
    labels: list[str]
    clips: Clips

    def bind(self, train: "TrainConfig", augment: AugmentConfig, audio_cfg: AudioConfig, labels: list[str]) -> "Task":
        """Give the task the run's configs and class names, then ``check`` them."""
        self.cfg, self.aug, self.audio_cfg, self.labels = train, augment, audio_cfg, list(labels)
        self.check(train, augment)
        return self

    def check(self, train: "TrainConfig", augment: AugmentConfig) -> None:
        """Refuse configurations before anything is decoded (and load what the task needs)."""

    def identity(self) -> dict[str, Any]:
        """The task's configs, for run.json (the engine adds data, protocol, training, audio)."""
        raise NotImplementedError

    def clean_cache(self, root, audio_cfg: AudioConfig, min_s: float):
        """The ClipCache of the clean representation (log-mel or waveform)."""
        raise NotImplementedError

    def make_clips(self, clean: list, labels: np.ndarray) -> Clips:
        raise NotImplementedError

    def represent(self, y: np.ndarray) -> np.ndarray:
        """A waveform as the cached representation (for the augmented pool)."""
        raise NotImplementedError

    def represent_id(self) -> dict[str, Any]:
        raise NotImplementedError

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

    def model_payload(self, model) -> dict[str, Any]:
        """What the model file needs besides the weights and the engine's configs."""
        raise NotImplementedError

    def load(self, path: Path):
        """The model in a written model file (``predict_proba_file(path)``)."""
        raise NotImplementedError

    def describe(self, model, clean: list, segment_s: float) -> dict[str, Any]:
        """metrics.json fields of the task: backbone, head, n_params, spec, config, n_segments."""
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


def train_epoch(
    model, opt, batches, on_step: Callable[[int, float], None] | None = None, label_smoothing: float = 0.0
) -> dict[str, float]:
    """One pass over ``batches`` of (x, soft targets). Returns mean loss, accuracy (against the
    dominant target) and the seconds spent in forward/backward/step (in all, and per step).
    Batches come from the host and go to the model's device (a no-op on the CPU).
    ``label_smoothing`` e: the loss is taken against (1 - e) * targets + e / n_classes."""
    dev = _model_device(model)
    total, correct, n, step_s = 0.0, 0, 0, []
    for step, (x, t) in enumerate(batches):
        t0 = time.perf_counter()
        x, t = _to_device(x, dev), _to_device(t, dev)
        logits = model(x)
        loss = soft_cross_entropy(
            logits, t if not label_smoothing else t * (1 - label_smoothing) + label_smoothing / t.shape[1]
        )
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


def predict(
    model, clips: Clips, idx: Sequence[int], segment_s: float, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray, float]:
    """Fixed-segment class probabilities [S, C], the clip index of each segment [S], and the
    mean segment cross-entropy (the validation loss)."""
    import torch

    model.eval()
    probs, owners, loss, n = [], [], 0.0, 0
    dev = _model_device(model)
    with torch.inference_mode():
        for x, owner in eval_batches(clips, idx, segment_s, batch_size):
            logits = model(_to_device(x, dev))
            y = torch.as_tensor(clips.labels[owner], device=logits.device)
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            n += len(owner)
            probs.append(torch.softmax(logits, dim=1).cpu().double().numpy())  # float64 on the host (MPS has none)
            owners.append(owner)
    if n == 0:
        raise DatasetError("no evaluation segments")
    return np.concatenate(probs), np.concatenate(owners), loss / n


def track_accuracy(proba: np.ndarray, owners: np.ndarray, labels: np.ndarray) -> float:
    """Mean-probability track vote accuracy."""
    from ..evaluate import aggregate

    ids, mean, _ = aggregate(owners, proba)
    return float((mean.argmax(1) == labels[ids]).mean())


def _model_device(model):
    import torch

    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _to_device(t, dev):
    """A host tensor on ``dev``: itself on the CPU; pinned and copied without blocking on CUDA."""
    if dev.type == "cpu" or t.device == dev:
        return t
    if dev.type == "cuda":
        t = t.pin_memory()
    return t.to(dev, non_blocking=True)


def _cpu(obj):
    """State dicts (nested dicts / lists of tensors) with every tensor on the CPU: artefacts are
    device-free (loaded with map_location="cpu"). On the CPU this returns the same tensors."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _rng_states(dev=None) -> dict[str, Any]:
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    s = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
    }
    if dev is not None and torch.device(dev).type == "cuda":  # dropout on CUDA draws from its generator
        s["cuda"] = torch.cuda.get_rng_state(dev)
    return s


def _set_rng_states(s: dict[str, Any], dev=None) -> None:
    import torch

    torch.set_rng_state(s["torch"])
    if "cuda" in s and dev is not None and torch.device(dev).type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], dev)
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((s["python_version"], tuple(s["python"]), None))


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    from ..io import atomic_write

    atomic_write(path, lambda fh: torch.save(obj, fh))


def load_checkpoint(path: Path, identity: str) -> dict[str, Any]:
    """A fold checkpoint (``<fold>.pt`` or ``<fold>.done.pt``) of this run's configuration."""
    from .model import read_torch_file

    c = read_torch_file(path, "unreadable checkpoint", EmbedkitError, "; delete it to redo the fold")
    if not isinstance(c, dict) or c.get("identity") != identity:
        raise ConfigMismatchError(
            f"{path}: checkpoint from a different configuration; resume with the original options and data, or start a new run"
        )
    return c


def fit_fold(
    task: Task,
    fold_index: int,
    fold: str,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    cfg: TrainConfig,
    ckpt_dir: Path,
    identity: str,
    progress: Progress | None = None,
) -> FoldFit:
    """Train one fold with early stopping, checkpointing after every epoch (see module doc)."""
    import torch

    ckpt_path = ckpt_dir / f"{fold}.pt"
    dev = torch.device(getattr(task, "device", None) or "cpu")
    torch.manual_seed(cfg.seed * 1009 + fold_index)  # same init for the same (seed, fold)
    model = task.build_model().to(dev)  # built on the CPU: the same initial weights on every device
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
        _set_rng_states(c["rng"], dev)
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
                progress(
                    {
                        "event": "step",
                        "fold": fold,
                        "fold_index": fold_index,
                        "epoch": epoch + 1,
                        "epochs": cfg.epochs,
                        "step": step,
                        "steps": steps,
                        "loss": loss,
                    }
                )

        tr = train_epoch(model, opt, batches, on_step, cfg.label_smoothing)
        rec: dict[str, Any] = {
            "epoch": epoch + 1,
            "phase": phase,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": tr["loss"],
            "train_acc": tr["acc"],
        }
        if len(val_idx):
            proba, owners, vloss = predict(model, task.clips, val_idx, cfg.segment_s)
            rec.update(
                val_loss=vloss,
                val_acc=track_accuracy(proba, owners, task.clips.labels),
                val_segment_acc=float((proba.argmax(1) == task.clips.labels[owners]).mean()),
            )
            monitor = vloss
        else:  # no validation part: keep the last epoch, never stop early
            rec.update(val_loss=None, val_acc=None)
            monitor = -float(epoch)
        rec.update(
            seconds=time.perf_counter() - t0,
            compute_s=tr["compute_s"],
            data_busy_s=batches.busy_s,
            data_wait_s=batches.wait_s,
        )
        st["history"].append(rec)
        if monitor < st["best_loss"]:
            st.update(best_loss=monitor, best_epoch=epoch + 1, bad=0)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            st["bad"] += 1
            st["stopped"] = st["bad"] >= cfg.patience
        st["epoch"] = epoch + 1
        # checkpoints hold CPU tensors (resume maps them to the run's device; the optimizer's
        # load_state_dict moves its state to the parameters' device)
        ckpt = {
            "identity": identity,
            "model": _cpu(model.state_dict()),
            "optimizer": _cpu(opt.state_dict()),
            "phase": phase,
            "state": st,
            "best_state": _cpu(best_state),
            "rng": _rng_states(dev),
        }
        _atomic_torch_save(ckpt, ckpt_path)
        if progress:
            progress(
                {
                    "event": "epoch",
                    "fold": fold,
                    "fold_index": fold_index,
                    "epochs": cfg.epochs,
                    **rec,
                    "best_epoch": st["best_epoch"],
                    "stopped": st["stopped"],
                }
            )
    if best_state is not None:
        model.load_state_dict(best_state)
    return FoldFit(
        model, st["history"], st["best_epoch"], sum(r["seconds"] for r in st["history"])
    )  # resumed epochs included


# ---------------------------------------------------------------------------------------------
# Folds


def check_folds(folds, val_size: float) -> None:
    for f in folds:
        if len(f.train) < 2:
            raise DatasetError(f"{f.name}: {len(f.train)} training track(s); too few clips for this protocol")
        if val_size > 0 and not f.val:
            raise DatasetError(f"{f.name}: no validation tracks for early stopping; use more clips or val_size 0")


def run_folds(
    task: Task,
    tracks: pd.DataFrame,
    folds,
    cfg: TrainConfig,
    run_dir: Path,
    identity: str,
    progress: Progress | None = None,
    n_fits: int | None = None,
):
    """Train every fold (skipping finished ones), evaluate on its test part with the track
    vote, write each fold's model. ``n_fits``: fits the progress total counts (the folds, plus
    a final model). Returns (Evaluation, learning curves, training seconds)."""
    import torch

    from ..evaluate import Evaluation

    pos = {t: i for i, t in enumerate(tracks["track_id"])}
    track_labels = dict(zip(tracks["track_id"], tracks["label"]))
    paths = dict(zip(tracks["track_id"], tracks["path"]))
    ckpt_dir = run_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "models").mkdir(exist_ok=True)
    ev = Evaluation(task.labels)
    curves, seconds = {}, 0.0
    if progress:  # every event says how many folds there are (for the progress bar's total)
        progress = (lambda report, n: lambda e: report({**e, "n_folds": n}))(progress, n_fits or len(folds))
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

            save_model(run_dir / "models" / f"{f.name}.pt", model_payload(task, fit.model, f.name))
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
        rec = ev.add_fold(
            f.name,
            owner_ids,
            d["proba"].numpy(),
            track_labels,
            paths,
            extra={
                "best_epoch": d["best_epoch"],
                "epochs_run": len(d["history"]),
                "train_seconds": d["seconds"],
                "n_train_tracks": d["n_train"],
                "n_val_tracks": d["n_val"],
            },
        )
        curves[f.name] = d["history"]
        seconds += d["seconds"]
        if progress:
            progress({"event": "fold_done", "fold": f.name, "fold_index": fi, **rec})
    return ev, curves, seconds


#: name of the model trained on every track after cross-validation
FINAL = "final"


def deployable_epochs(best_epochs: Sequence[int]) -> int:
    """Epoch budget of the model trained on every track after CV: the median of the folds'
    best epochs (rounded up; at least 1). The folds' validation parts chose it; the final model
    has no validation part to stop on."""
    return max(1, int(math.ceil(float(np.median(best_epochs)))))


def fit_final(
    task: Task,
    tracks: pd.DataFrame,
    cfg: TrainConfig,
    epochs: int,
    fold_index: int,
    run_dir: Path,
    identity: str,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """After cross-validation: one model on every labelled track for ``epochs`` epochs (no
    validation part: the last epoch is kept), written as ``models/final.pt``. Resumable like a
    fold (``checkpoints/final.pt`` per epoch, ``final.done.pt`` when finished). Returns
    {epochs, seconds, n_train}."""
    from .model import save_model

    ckpt_dir = run_dir / "checkpoints"
    done_path = ckpt_dir / f"{FINAL}.done.pt"
    if done_path.exists():
        return load_checkpoint(done_path, identity)
    idx = np.arange(len(tracks))
    final_cfg = replace(cfg, epochs=epochs)
    task.prepare_fold(idx)
    fit = fit_fold(task, fold_index, FINAL, idx, np.zeros(0, dtype=np.int64), final_cfg, ckpt_dir, identity, progress)
    save_model(run_dir / "models" / f"{FINAL}.pt", model_payload(task, fit.model, FINAL, final_cfg))
    d = {"identity": identity, "epochs": epochs, "seconds": fit.seconds, "n_train": len(idx)}
    _atomic_torch_save(d, done_path)
    (ckpt_dir / f"{FINAL}.pt").unlink(missing_ok=True)
    return d


def model_payload(task: Task, model, fold: str, cfg: TrainConfig | None = None) -> dict[str, Any]:
    """A fold's model file: the task's fields, the weights and every config that made them
    (nanoGPT's checkpoint-holds-config: ``load_model`` / ``load_finetuned`` rebuild from it)."""
    from ..io import plain, versions

    return {
        "kind": task.kind,
        **task.model_payload(model),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "labels": list(task.labels),
        "audio": asdict(task.audio_cfg),
        "segment_s": task.cfg.segment_s,
        "train_config": asdict(cfg or task.cfg),
        "augment": plain(task.aug.to_dict()),
        "fold": fold,
        "versions": {k: str(v) for k, v in versions().items()},  # plain str: weights_only loading
    }


# ---------------------------------------------------------------------------------------------
# A run


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]


@dataclass(frozen=True)
class RunOptions:
    """How and where a training run runs, shared by ``train_cnn`` and ``finetune``.

    cv: K of stratified K-fold (None: the dataset's split when it has train and test tracks,
        else a holdout of ``test_size``). folds: ready-made folds (the pipeline makes them once
        for every approach); tracks they name that are dropped as bad are left out of them.
    runs_dir / run_dir / resume: a new ``runs_dir/<run id>``, or this directory; ``resume``
        continues the run in ``run_dir`` after checking its identity.
    cache: clip cache root. threads: torch threads (None: all cores). workers: decode threads.
    skip_bad: drop unusable clips instead of stopping. name: run name (default per task).
    device / allow_tf32: where the model trains (``embedkit.device.resolve``); not part of the
        run's identity, so a run started on one device resumes on another.
    final: after CV, train the deployable model on every track (``fit_final``); False (for
        benchmarks that only need the CV estimate): model.pt is the first fold's model.
    """

    cv: int | None = None
    test_size: float = 0.2
    folds: tuple | None = None
    runs_dir: str | os.PathLike = "runs"
    run_dir: str | os.PathLike | None = None
    resume: bool = False
    cache: str | os.PathLike = "cache"
    threads: int | None = None
    workers: int | None = None
    skip_bad: bool = False
    name: str | None = None
    device: str = "cpu"
    allow_tf32: bool = False
    final: bool = True


def run_name(base: str, aug: AugmentConfig) -> str:
    if not aug.enabled:
        return base
    from .augment import ALL_AUGS

    return f"{base}+aug" if set(aug.enabled) == set(ALL_AUGS) else f"{base}+{'+'.join(aug.enabled)}"


@training_process_settings
def train_run(
    task: Task,
    tracks: pd.DataFrame,
    train: TrainConfig,
    audio_cfg: AudioConfig,
    augment: AugmentConfig,
    opts: RunOptions,
    progress: Progress | None = None,
) -> TrainResult:
    """Train and evaluate ``task`` on a track table; writes the run directory (module doc)."""
    from ..evaluate import dataset_summary, make_folds, protocol_dict, with_validation
    from ..runs import RunRecord, choose_protocol, dataset_fingerprint
    from .data import attach_augmentation
    from .runs import (
        cache_progress,
        checkpoint_identity,
        drop_failed,
        finish_run,
        inference_ms_per_track,
        inference_note,
        open_run_dir,
        set_threads,
    )

    train.validate()
    train.check_clip_length(audio_cfg.clip_s)
    from ..device import provenance, resolve

    task.device = resolve(opts.device, opts.allow_tf32)  # an unusable device fails before any work
    task.bind(train, augment, audio_cfg, sorted(tracks["label"].unique()))
    n_threads = set_threads(opts.threads)
    protocol = choose_protocol(tracks, opts.cv)
    k = opts.cv or 5
    # The folds, made once before any decoding (an impossible protocol fails fast); bad clips
    # dropped later leave them, so every approach of a pipeline run sees the same folds.
    folds = list(opts.folds) if opts.folds is not None else make_folds(tracks, protocol, k, opts.test_size, train.seed)
    name = opts.name or run_name(task.base_name, augment)
    identity = {
        "kind": task.kind,
        "dataset": dataset_fingerprint(tracks),
        "protocol": protocol,
        "cv": opts.cv,
        "test_size": opts.test_size,
        "train": asdict(train),
        **task.identity(),
        "audio": asdict(audio_cfg),
        "augment": augment.to_dict(),
        "skip_bad": opts.skip_bad,
    }
    run_dir = open_run_dir(opts.runs_dir, opts.run_dir, opts.resume, task.kind, name, identity, progress)
    progress_for = cache_progress(progress)
    t_cache = time.perf_counter()
    min_s = train.min_clip_s
    clean, failures = task.clean_cache(opts.cache, audio_cfg, min_s).build(
        tracks["path"].tolist(), opts.workers, progress_for(task.cache_what)
    )
    tracks, clean, skipped = drop_failed(tracks, clean, failures, opts.skip_bad)
    ident_hash = checkpoint_identity(identity, tracks)
    folds = with_validation([f.restricted(tracks["track_id"]) for f in folds], tracks, train.val_size, train.seed)
    check_folds(folds, train.val_size)
    label_idx = {l: i for i, l in enumerate(task.labels)}
    task.clips = task.make_clips(clean, np.array([label_idx[l] for l in tracks["label"]]))
    attach_augmentation(
        task.clips,
        tracks,
        folds,
        opts.cache,
        audio_cfg,
        min_s,
        augment,
        train.seed,
        represent=task.represent,
        represent_id=task.represent_id(),
        workers=opts.workers,
        cache_progress=progress_for,
    )
    cache_seconds = time.perf_counter() - t_cache

    final = protocol == "cv" and opts.final  # the deployable model: every track, after the folds
    ev, curves, train_seconds = run_folds(task, tracks, folds, train, run_dir, ident_hash, progress, len(folds) + final)
    if final:
        epochs = deployable_epochs([f["best_epoch"] for f in ev.folds])
        fin = fit_final(
            task,
            tracks,
            train,
            epochs,
            len(folds),
            run_dir,
            ident_hash,
            progress and (lambda e: progress({**e, "n_folds": len(folds) + 1})),
        )
        deployed = {
            "file": "model.pt",
            "source": f"models/{FINAL}.pt",
            "evaluated": False,
            "n_train_tracks": fin["n_train"],
            "epochs": fin["epochs"],
            "epochs_rule": "median of the folds' best epochs",
            "train_seconds": fin["seconds"],
            "note": "trained on every labelled track after CV; the metrics are the CV estimate of this procedure (models/<fold>.pt are the evaluated fold models)",
        }
    else:
        deployed = {
            "file": "model.pt",
            "source": f"models/{folds[0].name}.pt",
            "evaluated": True,
            "n_train_tracks": len(folds[0].train),
            "n_val_tracks": len(folds[0].val),
            "note": f"the evaluated model of the {protocol}"
            + (" (its first fold: no final fit requested)" if protocol == "cv" else ""),
        }

    # Inference cost from the file: decode + front end + fixed segments + forward + vote.
    model = task.load(run_dir / "models" / f"{folds[0].name}.pt")
    infer_ms = inference_ms_per_track(model, tracks, folds[0].test)
    facts = task.describe(model, clean, train.segment_s)
    n_segments = facts.pop("n_segments")
    record = RunRecord(
        run_id=run_dir.name,
        kind=task.kind,
        name=name,
        backbone=facts.pop("backbone"),
        head=facts.pop("head"),
        pretrained=facts.pop("pretrained"),
        weights=facts.pop("weights"),
        trains_backbone=True,
        needs_extraction=False,
        protocol={**protocol_dict(protocol, k, train.seed, opts.test_size, tracks), "val_size": train.val_size},
        dataset=dataset_summary(tracks, n_segments),
        spec=facts.pop("spec"),
        preprocess={"audio": asdict(audio_cfg), "segments": {"segment_s": train.segment_s, "hop_s": train.segment_s}},
        config={"train": asdict(train), **facts.pop("config"), "augment": augment.to_dict()},
        train_seconds=train_seconds,
        inference_ms_per_track=infer_ms,
        n_params=facts.pop("n_params"),
        weights_id=facts.pop("weights_id", None),
        device=provenance(task.device, "fp32", opts.allow_tf32),
    )
    metrics = {
        **record.to_dict(),
        "cache_seconds": cache_seconds,
        "threads": n_threads,
        **facts,
        "inference_note": inference_note(task.inference_steps, audio_cfg.clip_s, train.segment_s),
        "skipped": skipped,
        "final_fit_seconds": deployed.get("train_seconds", 0.0),
        "deployed_model": deployed,
    }
    return TrainResult(run_dir, finish_run(run_dir, ev, curves, metrics, FINAL if final else folds[0].name, tracks))
