"""``train_cnn``: the log-mel CNN trained from scratch, as a task on the training engine
(``loop.py``: folds, caching, resume, run directory and metrics are the engine's).

The task caches float16 log-mel spectrograms (``features.logmel_cache``), normalises each fold
with statistics of its clean training clips only, trains ``model.build_cnn(CNNConfig)`` with
Adam, and writes model files that ``model.load_model`` rebuilds from the file alone.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd

from ..config import AudioConfig
from . import recipe
from .augment import AugmentConfig
from .data import Clips
from .features import FeatureConfig, Normalizer
from .loop import Progress, RunOptions, Task, TrainConfig, TrainResult, run_name, train_run

__all__ = ["CNNTask", "TrainConfig", "TrainResult", "run_name", "train_cnn"]


class CNNTask(Task):
    kind = "cnn"
    base_name = "cnn-scratch"
    cache_what = "log-mel"
    inference_steps = "decode, log-mel"

    def __init__(self, model_cfg, features: FeatureConfig):
        self.model_cfg, self.feat = model_cfg, features
        self.sample_rate, self.hop = features.sample_rate, features.hop_length
        self.normalizer: Normalizer | None = None

    def check(self, train, augment):
        from .model import build_cnn

        build_cnn(self.model_cfg)  # validates the architecture before any decoding

    def identity(self):
        return {"model": self.model_cfg.to_dict(), "features": asdict(self.feat)}

    def clean_cache(self, root, audio_cfg, min_s):
        from .features import logmel_cache

        return logmel_cache(root, self.feat, audio_cfg, min_s)

    def make_clips(self, clean, labels):
        clips = Clips(
            clean=clean, labels=labels, n_classes=len(self.labels), hop=self.hop, sr=self.sample_rate, normalize=None
        )
        if self.aug.waveform and self.aug.wave_mode == "online":
            from .features import logmel_module

            front = logmel_module(self.feat)
            clips.featurize = lambda y: front(y)
        return clips

    def represent(self, y):
        from .features import logmel

        return logmel(y, self.feat).astype(np.float16)

    def represent_id(self):
        return {"logmel": asdict(self.feat), "sample_rate": self.feat.sample_rate}

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

    def model_payload(self, model):
        return {
            "model_config": self.model_cfg.to_dict(),
            "features": asdict(self.feat),
            "normalizer": self.normalizer.to_dict(),
        }

    def load(self, path):
        from .model import load_model

        return load_model(path)

    def describe(self, model, clean, segment_s):
        from .data import segment_starts
        from .model import count_macs, n_params

        n_frames = self.feat.n_frames(int(round(segment_s * self.feat.sample_rate)))
        return {
            "backbone": "logmel",
            "head": "cnn",
            "pretrained": False,
            "weights": "trained from scratch",
            "n_params": n_params(model.net),
            "macs_per_segment": count_macs(model.net, (1, self.feat.n_mels, n_frames)),
            "n_segments": sum(
                len(segment_starts(c.shape[-1], self.hop, self.sample_rate, segment_s)[0]) for c in clean
            ),
            "spec": {"features": asdict(self.feat)},
            "config": {"model": self.model_cfg.to_dict()},
        }


def train_cnn(
    tracks: pd.DataFrame,
    *,
    train: TrainConfig = TrainConfig(**recipe.TRAIN),
    channels: tuple[int, ...] = recipe.CHANNELS,
    dropout: float = 0.5,
    block_order: str = "conv-pool-bn-relu",
    features: FeatureConfig = FeatureConfig(**recipe.FEATURES),
    audio_cfg: AudioConfig = AudioConfig(),
    augment: AugmentConfig = AugmentConfig.parse(recipe.AUGMENT),
    progress: Progress | None = None,
    **run: Any,
) -> TrainResult:
    """Train and evaluate the scratch CNN on a track table (see loop.py for the run layout);
    the defaults are the measured recipe (``cnn/recipe.py``).
    ``run``: the :class:`~embedkit.cnn.loop.RunOptions` (cv, test_size, folds, runs_dir,
    run_dir, resume, cache, threads, workers, skip_bad, name)."""
    from .model import CNNConfig

    labels = sorted(tracks["label"].unique())
    model_cfg = CNNConfig(
        n_classes=len(labels),
        n_mels=features.n_mels,
        channels=tuple(channels),
        dropout=dropout,
        block_order=block_order,
    )
    return train_run(CNNTask(model_cfg, features), tracks, train, audio_cfg, augment, RunOptions(**run), progress)
