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
training engine's (loop.py), as for the scratch CNN: crops come from a cached waveform at the
backbone's rate.

The network and the model file this task writes (``build_finetune_net``, ``FinetunedModel``,
``load_finetuned``) live in ``embedkit.cnn.finetuned``, which inference loads without importing
this training task or the engine.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..config import AudioConfig
from ..errors import BackboneError, ConfigError
from .augment import AugmentConfig
from .data import Clips
from .finetuned import build_finetune_net, load_finetuned
from .loop import Progress, RunOptions, Task, TrainConfig, TrainResult, train_run


@dataclass(frozen=True)
class FinetuneConfig:
    backbone: str
    frozen_epochs: int = 3
    unfreeze: str = "auto"  # "all", "top:N", or "auto": default_unfreeze(backbone)
    # The new layer starts from random weights and a small set gives few steps per epoch (68
    # clips, batch 16: 5); at 1e-3 it had not converged after the frozen epochs on gtzan_mini
    # (validation loss still falling), at 1e-2 it had. A linear layer on normalised embeddings
    # takes that rate well.
    head_lr: float = 1e-2  # new layer while the backbone is frozen
    backbone_lr: float = 5e-5
    finetune_head_lr: float = 1e-4
    head_dropout: float = 0.25

    def __post_init__(self) -> None:
        if self.unfreeze == "auto":
            object.__setattr__(self, "unfreeze", default_unfreeze(self.backbone))

    def validate(self) -> None:
        """ConfigError naming the first bad field (the CLI shows it as its option)."""
        if self.frozen_epochs < 0:
            raise ConfigError(f"frozen_epochs must be >= 0, got {self.frozen_epochs}", field="frozen_epochs")
        if self.unfreeze != "all":
            ok = self.unfreeze.startswith("top:") and self.unfreeze[4:].isdigit() and int(self.unfreeze[4:]) >= 1
            if not ok:
                raise ConfigError(
                    f"unfreeze must be 'all' or 'top:N' (N >= 1), got {self.unfreeze!r}", field="unfreeze"
                )
        for name in ("head_lr", "backbone_lr", "finetune_head_lr"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name):g}", field=name)
        if not 0 <= self.head_dropout < 1:
            raise ConfigError(f"head_dropout must be in [0, 1), got {self.head_dropout:g}", field="head_dropout")


def default_unfreeze(backbone: str) -> str:
    """What is unfrozen after the frozen epochs unless asked: musicnn's top 6 blocks (its
    many-branch front end makes a fully unfrozen step ~10x dearer on CPU: measured 70 s vs 6 s
    a batch; top:6 reached 0.91 +/- 0.04 on gtzan_mini), everything for other backbones."""
    from ..backbones import get_spec

    try:
        family = get_spec(backbone).family
    except BackboneError:  # an unknown name is refused later, by the trainer, in one line
        return "all"
    return "top:6" if family == "musicnn" else "all"


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
        module(
            0.1 * torch.randn(2, int(round(seconds * sample_rate)), generator=gen)
        ).float().square().mean().backward()
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
        own = [
            p for n, p in module.named_parameters(prefix=prefix.rstrip("."), recurse=False) if used is None or n in used
        ]
        return ([(prefix.rstrip(".") or "<root>", None, own)] if own else []) + kids


def trainable_blocks(
    model, cfg: FinetuneConfig, phase: str, used: set[str] | None = None
) -> list[tuple[str, Any, list]]:
    """The backbone blocks that train in ``phase`` (none while frozen)."""
    if phase == "frozen":
        return []
    if cfg.unfreeze == "all":
        return [
            ("<all>", model.backbone, [p for n, p in model.backbone.named_parameters() if used is None or n in used])
        ]
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
    kind = "finetune"
    cache_what = "waveforms"
    inference_steps = "decode, resample"

    def __init__(self, ft: FinetuneConfig):
        from ..backbones import get_spec

        self.ft, self.spec = ft, get_spec(ft.backbone)  # unknown names raise BackboneError listing the valid ones
        self.base_name = f"finetune-{ft.backbone}"
        self.sample_rate = self.spec.sample_rate

    def check(self, train, augment):
        self.ft.validate()
        if augment.on("specaugment"):
            raise ConfigError(
                "augment: specaugment needs a spectrogram input; fine-tuning feeds waveforms to the backbone's own front end (use the waveform augmentations and mixup)",
                field="augment",
            )
        bb, module = resolve_backbone(self.ft.backbone)
        self.weights_id = bb.weights_id
        self._pristine = copy.deepcopy(module).cpu()  # every fold starts from the pretrained weights
        self.used = used_parameters(self._pristine, self.sample_rate, train.segment_s)

    def identity(self):
        return {"finetune": asdict(self.ft), "backbone_weights": self.weights_id}

    def clean_cache(self, root, audio_cfg, min_s):
        from .features import wave_cache

        return wave_cache(root, self.sample_rate, audio_cfg, min_s)

    def make_clips(self, clean, labels):
        return Clips(
            clean=clean,
            labels=labels,
            n_classes=len(self.labels),
            hop=1,
            sr=self.sample_rate,
            normalize=lambda x: x,
            waves=clean,
            featurize=None,
            spectrogram=False,
        )

    def represent(self, y):
        return y.astype(np.float32)

    def represent_id(self):
        return {"waveform": True, "sample_rate": self.sample_rate}

    def build_model(self):
        return build_finetune_net(
            copy.deepcopy(self._pristine), self.spec.embedding_dim, len(self.labels), self.ft.head_dropout
        )

    def phase(self, epoch: int) -> str:
        return "frozen" if epoch < self.ft.frozen_epochs else "finetune"

    def set_mode(self, model, phase):
        apply_phase(model, self.ft, phase, self.used)

    def make_optimizer(self, model, phase):
        import torch

        body = apply_phase(model, self.ft, phase, self.used)
        if phase == "frozen":
            return torch.optim.Adam(model.head.parameters(), lr=self.ft.head_lr, weight_decay=self.cfg.weight_decay)
        groups = [
            {"params": list(model.head.parameters()), "lr": self.ft.finetune_head_lr},
            {"params": body, "lr": self.ft.backbone_lr},
        ]
        return torch.optim.Adam(groups, weight_decay=self.cfg.weight_decay)

    def model_payload(self, model):
        from ..backbones.architecture import describe
        from ..io import plain

        return {
            "backbone": self.spec.name,
            "weights_id": self.weights_id,
            "spec": plain(self.spec.to_dict()),
            "finetune": asdict(self.ft),
            "architecture": describe(self.spec, self._pristine),  # loads without the original checkpoint
        }

    def load(self, path):
        return load_finetuned(path)

    def describe(self, model, clean, segment_s):
        from ..audio.segments import window_starts
        from ..io import plain
        from .model import n_params

        return {
            "backbone": self.spec.name,
            "head": "linear",
            "pretrained": self.spec.pretrained,
            "weights": self.spec.weights,
            "n_params": n_params(model.net),
            "n_segments": sum(len(window_starts(len(w), self.sample_rate, segment_s, segment_s)) for w in clean),
            "spec": plain(self.spec.to_dict()),
            "weights_id": self.weights_id,
            "config": {"finetune": asdict(self.ft)},
        }


def resolve_backbone(name: str):
    """Load a registered backbone and its torch module, or raise a one-line BackboneError."""
    from ..backbones import load_backbone

    bb = load_backbone(name)  # unknown names raise BackboneError listing the valid ones
    module = bb.torch_module()
    if module is None:
        raise BackboneError(
            f"backbone {name!r} has no PyTorch module (torch_module() is None) and cannot be fine-tuned; try one of the torch backbones, e.g. tiny-test or musicnn-msd"
        )
    return bb, module


def finetune(
    tracks: pd.DataFrame,
    backbone: str,
    *,
    train: TrainConfig = TrainConfig(epochs=20, patience=5),
    ft: FinetuneConfig | None = None,
    audio_cfg: AudioConfig = AudioConfig(),
    augment: AugmentConfig = AugmentConfig(),
    progress: Progress | None = None,
    **run: Any,
) -> TrainResult:
    """Fine-tune ``backbone`` on a track table; writes runs/<run-id>/ like train_cnn (kind
    "finetune"). SpecAugment is refused: the backbone's own front end makes its spectrogram.
    ``run``: the :class:`~embedkit.cnn.loop.RunOptions` (cv, test_size, folds, runs_dir,
    run_dir, resume, cache, threads, workers, skip_bad, name)."""
    ft = ft or FinetuneConfig(backbone)
    if ft.backbone != backbone:
        ft = FinetuneConfig(backbone, **{k: v for k, v in asdict(ft).items() if k != "backbone"})
    return train_run(FinetuneTask(ft), tracks, train, audio_cfg, augment, RunOptions(**run), progress)
