"""Fine-tuning a registered PyTorch backbone: ``embedkit finetune DATA --backbone NAME``.

The backbone's ``torch_module()`` (waveform [B, N] at spec.sample_rate -> embedding [B, D])
gets a new output layer (dropout + linear, D -> n_labels). Two phases:

1. ``frozen`` (the first ``frozen_epochs``): only the new layer trains (Adam, ``head_lr``).
   The whole backbone is in eval mode, so its batch norm layers normalise with their
   pretrained running statistics and do not update them: a few epochs of batch-16 crops from
   a new dataset would otherwise overwrite statistics estimated on a large corpus while the
   features they feed are not being adapted anyway. Its dropout is off too.
2. ``finetune``: the chosen part of the backbone (``unfreeze``: "all", or "top:N" for the last
   N blocks) trains at a low rate (``backbone_lr``, default 5e-5; the new layer at
   ``finetune_head_lr``, 1e-4) with a fresh Adam. Unfrozen blocks run in train mode (their
   batch norm adapts); blocks still frozen stay in eval mode.

Blocks are the backbone's top-level child modules that hold parameters, in definition order
(descending through single-child wrappers), so "top:N" works for any module without a
per-backbone table. Data, augmentation, early stopping, resume and the run artefacts are the
scratch CNN's (train.py): crops come from a cached waveform at the backbone's rate.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..config import AudioConfig
from ..errors import BackboneError, DatasetError, ModelLoadingError
from .augment import AugmentConfig
from .data import Clips
from .runs import inference_ms_per_track, plain, training_process_settings
from .train import Progress, Task, TrainConfig, TrainResult


@dataclass(frozen=True)
class FinetuneConfig:
    backbone: str
    frozen_epochs: int = 3
    unfreeze: str = "all"  # "all" or "top:N"
    # The new layer starts from random weights and a small set gives few steps per epoch (68
    # clips, batch 16: 5); at 1e-3 it had not converged after the frozen epochs on gtzan_mini
    # (validation loss still falling), at 1e-2 it had. A linear layer on normalised embeddings
    # takes that rate well.
    head_lr: float = 1e-2  # new layer while the backbone is frozen
    backbone_lr: float = 5e-5
    finetune_head_lr: float = 1e-4
    head_dropout: float = 0.25

    def validate(self) -> None:
        if self.frozen_epochs < 0:
            raise DatasetError("--frozen-epochs must be >= 0")
        if self.unfreeze != "all":
            ok = self.unfreeze.startswith("top:") and self.unfreeze[4:].isdigit() and int(self.unfreeze[4:]) >= 1
            if not ok:
                raise DatasetError(f"--unfreeze must be 'all' or 'top:N' (N >= 1), got {self.unfreeze!r}")
        if min(self.head_lr, self.backbone_lr, self.finetune_head_lr) <= 0:
            raise DatasetError("learning rates must be positive")
        if not 0 <= self.head_dropout < 1:
            raise DatasetError(f"--head-dropout must be in [0, 1), got {self.head_dropout:g}")


def build_finetune_net(backbone_module, embedding_dim: int, n_classes: int, dropout: float):
    """nn.Module: waveform [B, N] -> logits [B, n_classes]; ``.backbone`` and ``.head``."""
    from torch import nn

    class FinetuneNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone_module
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(embedding_dim, n_classes))

        def forward(self, y):
            return self.head(self.backbone(y))

    return FinetuneNet()


def used_parameters(module, sample_rate: int, seconds: float) -> set[str]:
    """Names of the parameters that reach the embedding: one forward/backward on noise.

    A backbone module may carry parameters its embedding does not use (musicnn keeps its tag
    layer); they get no gradient, so they are left out of the blocks and the optimizer."""
    import torch

    was = module.training
    module.eval()
    for p in module.parameters():
        p.grad = None
    gen = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        module(0.1 * torch.randn(2, int(round(seconds * sample_rate)), generator=gen)).float().square().mean().backward()
    used = {n for n, p in module.named_parameters() if p.grad is not None}
    for p in module.parameters():
        p.grad = None
    module.train(was)
    return used


def backbone_blocks(module, used: set[str] | None = None) -> list[tuple[str, Any, list]]:
    """(name, module, used parameters) of the blocks "top:N" counts from the end: the
    backbone's child modules that hold used parameters, in definition order, descending while
    there is exactly one such child (a wrapper around a Sequential, say)."""
    prefix = ""
    while True:
        kids = []
        for n, m in module.named_children():
            ps = [p for pn, p in m.named_parameters(prefix=prefix + n) if used is None or pn in used]
            if ps:
                kids.append((prefix + n, m, ps))
        if len(kids) == 1 and any(True for _ in kids[0][1].children()):
            prefix += kids[0][0][len(prefix) :] + "."
            module = kids[0][1]
            continue
        own = [p for n, p in module.named_parameters(prefix=prefix.rstrip("."), recurse=False) if used is None or n in used]
        return ([(prefix.rstrip(".") or "<root>", None, own)] if own else []) + kids


def trainable_blocks(model, cfg: FinetuneConfig, phase: str, used: set[str] | None = None) -> list[tuple[str, Any, list]]:
    """The backbone blocks that train in ``phase`` (none while frozen)."""
    if phase == "frozen":
        return []
    if cfg.unfreeze == "all":
        return [("<all>", model.backbone, [p for n, p in model.backbone.named_parameters() if used is None or n in used])]
    return backbone_blocks(model.backbone, used)[-int(cfg.unfreeze[4:]) :]


def apply_phase(model, cfg: FinetuneConfig, phase: str, used: set[str] | None = None) -> list:
    """Set requires_grad and train/eval modes for ``phase`` (see module doc); returns the
    backbone parameters that train."""
    model.train()
    model.backbone.eval()
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    body = []
    for _, block, params in trainable_blocks(model, cfg, phase, used):
        if block is not None:
            block.train()
        for p in params:
            p.requires_grad_(True)
        body += params
    for p in model.head.parameters():
        p.requires_grad_(True)
    return body


def trainable_names(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


class FinetuneTask(Task):
    def __init__(self, clips: Clips, module, spec, weights_id: str, ft: FinetuneConfig, cfg: TrainConfig, aug: AugmentConfig, audio_cfg: AudioConfig, labels: list[str]):
        self.clips, self.ft, self.cfg, self.aug, self.audio_cfg, self.labels = clips, ft, cfg, aug, audio_cfg, labels
        self.spec, self.weights_id = spec, weights_id
        self._pristine = copy.deepcopy(module).cpu()  # every fold starts from the pretrained weights
        self.used = used_parameters(self._pristine, spec.sample_rate, cfg.segment_s)

    def build_model(self):
        return build_finetune_net(copy.deepcopy(self._pristine), self.spec.embedding_dim, len(self.labels), self.ft.head_dropout)

    def phase(self, epoch: int) -> str:
        return "frozen" if epoch < self.ft.frozen_epochs else "finetune"

    def set_mode(self, model, phase):
        apply_phase(model, self.ft, phase, self.used)

    def make_optimizer(self, model, phase):
        import torch

        body = apply_phase(model, self.ft, phase, self.used)
        if phase == "frozen":
            return torch.optim.Adam(model.head.parameters(), lr=self.ft.head_lr, weight_decay=self.cfg.weight_decay)
        groups = [{"params": list(model.head.parameters()), "lr": self.ft.finetune_head_lr}, {"params": body, "lr": self.ft.backbone_lr}]
        return torch.optim.Adam(groups, weight_decay=self.cfg.weight_decay)

    def model_payload(self, model, fold):
        from ..backbones.architecture import describe
        from ..io import versions

        return {
            "kind": "finetune",
            "backbone": self.spec.name,
            "weights_id": self.weights_id,
            "spec": plain(self.spec.to_dict()),
            "architecture": describe(self.spec, self._pristine),  # loads without the original checkpoint
            "finetune": asdict(self.ft),
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "labels": list(self.labels),
            "audio": asdict(self.audio_cfg),
            "segment_s": self.cfg.segment_s,
            "train_config": asdict(self.cfg),
            "augment": plain(self.aug.to_dict()),
            "fold": fold,
            "versions": {k: str(v) for k, v in versions().items()},
        }


@dataclass
class FinetunedModel:
    """A fine-tuned backbone + head; ``predict_proba_file(path)`` -> (segments [K, C], mean [C])."""

    net: Any
    labels: list[str]
    sample_rate: int
    audio: AudioConfig
    segment_s: float = 5.0
    meta: dict[str, Any] = field(default_factory=dict)

    def predict_proba_file(self, path) -> tuple[np.ndarray, np.ndarray]:
        """The one inference path (``embedkit.tagger.FinetuneTagger``)."""
        from ..tagger import FinetuneTagger

        p, _ = FinetuneTagger.from_model(self).predict_file(path)
        return p, p.mean(axis=0)


def load_finetuned(path: str | os.PathLike) -> FinetunedModel:
    """Rebuild from the file alone: the architecture record stored beside the weights
    (``embedkit.backbones.architecture``) + the stored weights (all of them, backbone included),
    so PANNs / AST fine-tunes load without the original checkpoint. Files written before the
    record existed are rebuilt from the registered backbone (which then needs its weights)."""
    from ..backbones import load_backbone
    from ..backbones.architecture import rebuild
    from ..config import from_dict
    from .model import read_model_file

    d = read_model_file(path)
    if d.get("kind") != "finetune":
        raise ModelLoadingError(f"{path}: a {d.get('kind')!r} model; load scratch CNNs with embedkit.cnn.model.load_model")
    if "architecture" in d:
        module = rebuild(d["architecture"], str(path))
    else:
        module = load_backbone(d["backbone"]).torch_module()
        if module is None:
            raise ModelLoadingError(f"{path}: backbone {d['backbone']!r} no longer provides a torch module")
    # a copy: load_state_dict below must not write into tensors a backbone loader may share
    net = build_finetune_net(copy.deepcopy(module), int(d["spec"]["embedding_dim"]), len(d["labels"]), float(d["finetune"]["head_dropout"]))
    try:
        net.load_state_dict(d["state_dict"])
    except RuntimeError as exc:
        raise ModelLoadingError(f"{path}: weights do not fit backbone {d['backbone']!r} ({str(exc).splitlines()[0]})") from None
    net.eval()
    meta = {"backbone": d["backbone"], "fold": d.get("fold"), "spec": d["spec"], "weights_id": d.get("weights_id")}
    return FinetunedModel(net, list(d["labels"]), int(d["spec"]["sample_rate"]), from_dict(AudioConfig, d["audio"]), float(d["segment_s"]), meta)


def resolve_backbone(name: str):
    """Load a registered backbone and its torch module, or raise a one-line BackboneError."""
    from ..backbones import load_backbone

    bb = load_backbone(name)  # unknown names raise BackboneError listing the valid ones
    module = bb.torch_module()
    if module is None:
        raise BackboneError(f"backbone {name!r} has no PyTorch module (torch_module() is None) and cannot be fine-tuned; try one of the torch backbones, e.g. tiny-test or musicnn-msd")
    return bb, module


@training_process_settings
def finetune(
    tracks: pd.DataFrame,
    backbone: str,
    *,
    cv: int | None = None,
    test_size: float = 0.2,
    train: TrainConfig = TrainConfig(epochs=20, patience=5),
    ft: FinetuneConfig | None = None,
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
    """Fine-tune ``backbone`` on a track table; writes runs/<run-id>/ like train_cnn (kind
    "finetune"). SpecAugment is refused: the backbone's own front end makes its spectrogram."""
    from ..evaluate import dataset_summary, make_folds, protocol_dict
    from ..segments import window_starts
    from .features import wave_cache
    from .model import n_params
    from .data import attach_augmentation
    from .runs import cache_progress, checkpoint_identity, choose_protocol, dataset_fingerprint, drop_failed, finish_run, inference_note, open_run_dir, set_threads
    from .train import check_folds, run_folds, run_name

    ft = ft or FinetuneConfig(backbone)
    if ft.backbone != backbone:
        ft = FinetuneConfig(backbone, **{k: v for k, v in asdict(ft).items() if k != "backbone"})
    ft.validate()
    train.validate()
    train.check_clip_length(audio_cfg.clip_s)
    if augment.on("specaugment"):
        raise DatasetError("specaugment needs a spectrogram input; fine-tuning feeds waveforms to the backbone's own front end (use the waveform augmentations and mixup)")
    n_threads = set_threads(threads)
    bb, module = resolve_backbone(backbone)
    spec = bb.spec
    protocol = choose_protocol(tracks, cv, test_size)
    make_folds(tracks, protocol, cv or 5, test_size, train.seed, train.val_size)
    labels = sorted(tracks["label"].unique())
    name = name or run_name(f"finetune-{backbone}", augment)
    identity = {
        "kind": "finetune", "dataset": dataset_fingerprint(tracks), "protocol": protocol, "cv": cv, "test_size": test_size,
        "train": asdict(train), "finetune": asdict(ft), "backbone_weights": bb.weights_id, "audio": asdict(audio_cfg),
        "augment": augment.to_dict(), "skip_bad": skip_bad,
    }  # fmt: skip
    run_dir = open_run_dir(runs_dir, run_dir, resume, "finetune", name, identity, progress)
    progress_for = cache_progress(progress)
    t_cache = time.perf_counter()
    min_s = train.min_clip_s
    waves, failures = wave_cache(cache, spec.sample_rate, audio_cfg, min_s).build(tracks["path"].tolist(), workers, progress_for("waveforms"))
    tracks, waves, skipped = drop_failed(tracks, waves, failures, skip_bad)
    ident_hash = checkpoint_identity(identity, tracks)
    folds = make_folds(tracks, protocol, cv or 5, test_size, train.seed, train.val_size)
    check_folds(folds, train.val_size)
    label_idx = {l: i for i, l in enumerate(labels)}
    clips = Clips(
        clean=waves, labels=np.array([label_idx[l] for l in tracks["label"]]), n_classes=len(labels), hop=1, sr=spec.sample_rate,
        normalize=lambda x: x, waves=waves, featurize=None, spectrogram=False,
    )  # fmt: skip
    attach_augmentation(
        clips, tracks, folds, cache, audio_cfg, min_s, augment, train.seed,
        represent=lambda y: y.astype(np.float32), represent_id={"waveform": True, "sample_rate": spec.sample_rate},
        workers=workers, cache_progress=progress_for,
    )  # fmt: skip
    cache_seconds = time.perf_counter() - t_cache

    task = FinetuneTask(clips, module, spec, bb.weights_id, ft, train, augment, audio_cfg, labels)
    ev, curves, train_seconds = run_folds(task, tracks, folds, train, run_dir, ident_hash, labels, progress)

    model = load_finetuned(run_dir / "models" / f"{folds[0].name}.pt")
    infer_ms = inference_ms_per_track(model, tracks, folds[0].test)
    n_segments = sum(len(window_starts(len(w), spec.sample_rate, train.segment_s, train.segment_s)) for w in waves)
    metrics = {
        "run_id": run_dir.name, "kind": "finetune", "name": name, "backbone": backbone, "head": "linear",
        "protocol": {**protocol_dict(protocol, cv or 5, train.seed, test_size, tracks), "val_size": train.val_size},
        "dataset": dataset_summary(tracks, n_segments),
        "train_seconds": train_seconds, "cache_seconds": cache_seconds, "inference_ms_per_track": infer_ms,
        "inference_note": inference_note("decode, resample", audio_cfg.clip_s, train.segment_s),
        "n_params": n_params(model.net), "threads": n_threads,
        "spec": plain(spec.to_dict()), "weights_id": bb.weights_id,
        "preprocess": {"audio": asdict(audio_cfg), "segments": {"segment_s": train.segment_s, "hop_s": train.segment_s}},
        "config": {"train": asdict(train), "finetune": asdict(ft), "augment": augment.to_dict()},
        "skipped": skipped,
    }  # fmt: skip
    return TrainResult(run_dir, finish_run(run_dir, ev, curves, metrics, folds[0].name))
