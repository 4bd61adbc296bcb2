"""`ast` / `ast-5s`: the Audio Spectrogram Transformer (Gong et al. 2021) via ``transformers``.

Weights: a ``save_pretrained`` directory (``--checkpoint DIR`` or ``$EMBEDKIT_AST_MODEL``) or a
hub id (default ``MIT/ast-finetuned-audioset-10-10-0.4593``). A hub id is looked up in the local
Hugging Face cache first; otherwise it is downloaded only when the hub answers a 3 s probe and
``HF_HUB_OFFLINE`` is not set, so an offline machine gets one clear line at once (plain
``from_pretrained`` retries for ~46 s before failing).

Input 16 kHz. Front end = transformers' own ``ASTFeatureExtractor`` (Kaldi-style 128-band fbank,
25 ms / 10 ms, AudioSet normalisation), padded or cut to ``max_length`` frames. Embedding = the
768-d pooled output ((CLS + distillation token) / 2). With an AudioSet classification head in
the directory, ``clipwise`` = sigmoid(logits), 527 AudioSet probabilities.

Cost of the fixed input size: the reference pads every input to 1024 frames (10.24 s), so a 5 s
segment costs as much as a 10 s one. Two efficient options (bench/bench_backbones.py measures
both): extract ``ast`` with ``--segment 10`` (no model change: ~half the forwards per clip), or
use ``ast-5s``: max_length 512 frames (5.12 s). ``ast-5s`` keeps the first 50 of the 101
time-position embeddings, i.e. exactly the positions a 5 s segment occupies inside the padded
1024-frame input; what changes is that the ~525 frames of padding no longer take part in
attention. Its effect on accuracy with the real weights could not be measured here (no weights).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import BackboneError, ModelLoadingError, first_line
from ..weights import dir_sha256, hf_offline, hub_reachable, looks_like_hub_id
from .base import Backbone, BackboneSpec
from .registry import register_backbone

DEFAULT_MODEL = "MIT/ast-finetuned-audioset-10-10-0.4593"
ENV_VAR = "EMBEDKIT_AST_MODEL"
SR = 16000
REQUIRES = "pip install 'embedkit[ast]'"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
HUB_PATTERNS = ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json"]

SPEC = BackboneSpec(
    name="ast",
    family="ast",
    sample_rate=SR,
    embedding_dim=768,
    segment_s=10.0,
    frontend={
        "features": "ASTFeatureExtractor (kaldi fbank)",
        "n_mels": 128,
        "frame_ms": 25,
        "hop_ms": 10,
        "max_length": 1024,
        "normalise": "AudioSet mean/std",
    },
    weights=f"hub {DEFAULT_MODEL} (cache, or online) or a save_pretrained dir: --checkpoint / ${ENV_VAR}",
    license="BSD-3-Clause",
    description="Audio Spectrogram Transformer (AudioSet): 768-d pooled embedding; every input is padded to 10.24 s",
    outputs=("clipwise",),
    requires=REQUIRES,
)
SPEC_5S = replace(
    SPEC,
    name="ast-5s",
    segment_s=5.0,
    frontend={**SPEC.frontend, "max_length": 512, "time_positions": "first 50 of 101"},
    description="AST on 5.12 s inputs (no padding to 10.24 s; first 50 time positions): ~2x cheaper per 5 s segment; accuracy impact unmeasured",
)
MAX_LENGTH = {"ast": None, "ast-5s": 512}  # None: the directory's own max_length


def max_samples(max_length: int) -> int:
    """Longest waveform (samples at 16 kHz) whose 25 ms / 10 ms frames fit in max_length frames."""
    return 400 + 160 * (max_length - 1)


def resolve_model_dir(checkpoint: str | None = None) -> Path:
    """--checkpoint -> $EMBEDKIT_AST_MODEL -> default hub id; a hub id -> local cache -> (online) download."""
    ref = str(checkpoint) if checkpoint else os.environ.get(ENV_VAR) or DEFAULT_MODEL
    p = Path(os.path.expanduser(ref))
    if p.exists():
        if not p.is_dir():
            raise ModelLoadingError(
                f"{p}: expected a save_pretrained directory (config.json, preprocessor_config.json, model.safetensors), got a file"
            )
        return p
    if not looks_like_hub_id(ref):
        raise ModelLoadingError(f"{ref}: AST model directory not found")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    def complete(d: Path) -> bool:
        return (
            (d / "config.json").is_file()
            and (d / "preprocessor_config.json").is_file()
            and any((d / f).is_file() for f in WEIGHT_FILES)
        )

    cached = None
    try:
        cached = Path(snapshot_download(ref, local_files_only=True, allow_patterns=HUB_PATTERNS))
        if complete(cached):
            return cached
    except LocalEntryNotFoundError:
        pass
    where = "only partly in the local Hugging Face cache" if cached else "not in the local Hugging Face cache"
    fix = f"download it once with network (`hf download {ref}`) or pass --checkpoint DIR (a save_pretrained directory)"
    if hf_offline():
        raise ModelLoadingError(f"{ref}: {where} and HF_HUB_OFFLINE is set; {fix}")
    if not hub_reachable():
        raise ModelLoadingError(f"{ref}: {where} and the hub is unreachable (offline?); {fix}")
    try:
        d = Path(snapshot_download(ref, allow_patterns=HUB_PATTERNS))
        if not any((d / f).exists() for f in WEIGHT_FILES):  # repo without safetensors
            d = Path(snapshot_download(ref, allow_patterns=HUB_PATTERNS + ["pytorch_model.bin*"]))
        return d
    except Exception as exc:
        raise ModelLoadingError(f"{ref}: download from the Hugging Face hub failed ({first_line(exc, 200)})") from None


def _check_dir(d: Path) -> tuple[dict, list[str]]:
    """Validate a save_pretrained directory; return (config dict, files that identify the weights)."""
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadingError(f"{d}: not a save_pretrained directory (no config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadingError(f"{cfg_path}: unreadable config ({exc})") from None
    if cfg.get("model_type") != "audio-spectrogram-transformer":
        raise ModelLoadingError(
            f"{d}: config.json describes model_type {cfg.get('model_type')!r}, not an Audio Spectrogram Transformer"
        )
    if not (d / "preprocessor_config.json").is_file():
        raise ModelLoadingError(
            f"{d}: no preprocessor_config.json (save the ASTFeatureExtractor with save_pretrained too)"
        )
    weights = [f for f in WEIGHT_FILES if (d / f).is_file()]
    if not weights:
        raise ModelLoadingError(f"{d}: no weights file ({' / '.join(WEIGHT_FILES[::2])})")
    shards = []
    for idx in (w for w in weights if w.endswith(".index.json")):
        shards += sorted(set(json.loads((d / idx).read_text()).get("weight_map", {}).values()))
    return cfg, ["config.json", "preprocessor_config.json", *weights, *shards]


def _resize_time_positions(model, max_length: int) -> None:
    """Give ``model`` (ASTModel) ``max_length`` input frames: keep the first time-position
    embeddings (shorter input) or interpolate them along time (longer input)."""
    import torch
    import torch.nn.functional as F

    cfg = model.config
    emb = model.embeddings
    f_dim, t_old = emb.get_shape(cfg)
    t_new = (max_length - cfg.patch_size) // cfg.time_stride + 1
    pos = emb.position_embeddings.data  # [1, 2 + f_dim * t_old, H], patches ordered f-major
    grid = pos[:, 2:].reshape(1, f_dim, t_old, -1)
    if t_new <= t_old:
        grid = grid[:, :, :t_new]
    else:
        grid = F.interpolate(
            grid.permute(0, 3, 1, 2), size=(f_dim, t_new), mode="bilinear", align_corners=False
        ).permute(0, 2, 3, 1)
    new = torch.cat([pos[:, :2], grid.reshape(1, f_dim * t_new, -1)], dim=1).contiguous()
    emb.position_embeddings = torch.nn.Parameter(new, requires_grad=emb.position_embeddings.requires_grad)
    cfg.max_length = max_length


def _waveform_module(model, head, fe):
    """nn.Module waveform [B, L] -> pooled embedding [B, H] (the fbank front end has no
    parameters, so it runs in NumPy; gradients reach every model weight for fine-tuning)."""
    from torch import nn

    class ASTWaveform(nn.Module):
        def __init__(self):
            super().__init__()
            self.ast = model
            self.head = head  # None without an AudioSet head
            self.feature_extractor = fe  # its settings go into fine-tuned model files (architecture.py)

        def features(self, y):
            import torch

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                x = fe(
                    list(y.detach().cpu().numpy().astype(np.float32)),
                    sampling_rate=fe.sampling_rate,
                    return_tensors="np",
                )["input_values"]
            return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(y.device)

        def forward_both(self, y):
            pooled = self.ast(self.features(y)).pooler_output
            return pooled, (self.head(pooled) if self.head is not None else None)

        def forward(self, y):
            return self.forward_both(y)[0]

    return ASTWaveform().eval()


def _fbank_module(fe):
    """The feature extractor's NumPy Kaldi fbank (``transformers.audio_utils.spectrogram``:
    25 ms Hann frames every 10 ms, no centring, DC removal, pre-emphasis 0.97, 512-point power
    spectrum, Kaldi mel filters, log with floor, pad/cut to ``max_length`` frames, AudioSet
    normalisation) as torch ops, for ONNX export: waveform [B, L] -> input_values [B, max_length,
    n_mels]. Runs in float64 like the NumPy original (the DFT is a matmul with a cos/sin basis,
    an op every ONNX runtime has), then casts to float32 where the original does."""
    import torch
    from torch import nn

    frame, hop, n_fft = 400, 160, 512
    if len(fe.window) != frame:
        raise BackboneError(
            f"AST feature extractor with a {len(fe.window)}-sample window: only the 400-sample (25 ms) front end exports"
        )
    k = np.arange(n_fft // 2 + 1)
    n = np.arange(frame)[:, None]
    ang = 2 * np.pi * n * k / n_fft

    class Fbank(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("window", torch.from_numpy(np.asarray(fe.window, dtype=np.float64)))
            self.register_buffer("cos", torch.from_numpy(np.cos(ang)))
            self.register_buffer("sin", torch.from_numpy(np.sin(ang)))
            self.register_buffer("mel", torch.from_numpy(np.asarray(fe.mel_filters, dtype=np.float64)))  # [257, n_mels]
            self.max_length, self.mean, self.std = int(fe.max_length), float(fe.mean), float(fe.std)
            self.normalize = bool(fe.do_normalize)

        def forward(self, y):
            x = y.to(torch.float64).unfold(-1, frame, hop)  # [B, T, 400]
            x = x - x.mean(dim=-1, keepdim=True)
            x = torch.cat([x[..., :1] * (1 - 0.97), x[..., 1:] - 0.97 * x[..., :-1]], dim=-1) * self.window
            power = (x @ self.cos) ** 2 + (x @ self.sin) ** 2  # |rfft(x, 512)|^2
            logmel = torch.log(torch.clamp(power @ self.mel, min=1.192092955078125e-07)).to(torch.float32)
            t = logmel.shape[1]
            if t < self.max_length:
                logmel = torch.nn.functional.pad(logmel, (0, 0, 0, self.max_length - t))
            else:
                logmel = logmel[:, : self.max_length]
            return (logmel - self.mean) / (self.std * 2) if self.normalize else logmel

    return Fbank().eval()


def export_module(module):
    """An ASTWaveform (``torch_module()``) -> the same network with the torch fbank front end
    (``_fbank_module``): waveform [B, L] -> pooled embedding [B, H], traceable by torch.export."""
    from torch import nn

    class ASTExport(nn.Module):
        def __init__(self):
            super().__init__()
            self.fbank = _fbank_module(module.feature_extractor)
            self.ast = module.ast

        def forward(self, y):
            return self.ast(self.fbank(y)).pooler_output

    return ASTExport().eval()


class AST(Backbone):
    """A loaded AST. embed: float32 [B, L] at 16 kHz (L <= max_samples) -> [B, hidden_size]."""

    def __init__(
        self, spec: BackboneSpec, module, labels: list[str] | None, weights_id: str, max_length: int, path: Path
    ):
        import torch

        self.spec, self.module, self.labels, self.weights_id = spec, module, labels, weights_id
        self.max_length, self.path, self._torch = max_length, path, torch

    def _run(self, segments: np.ndarray, want_clip: bool):
        y = np.ascontiguousarray(segments, dtype=np.float32)
        if y.ndim != 2:
            raise BackboneError(f"{self.spec.name}: segments must be [B, L], got shape {y.shape}")
        limit = max_samples(self.max_length)
        if y.shape[0] and not 400 <= y.shape[1] <= limit:
            # The reference would silently cut longer input; refuse instead of dropping audio.
            raise BackboneError(
                f"{self.spec.name}: segments must be 0.025-{limit / SR:.3f} s ({self.max_length} frames); got {y.shape[1] / SR:.3f} s: use a shorter --segment"
            )
        if y.shape[0] == 0:
            return np.zeros((0, self.spec.embedding_dim), np.float32), np.zeros((0, len(self.labels or [])), np.float32)
        with self._torch.inference_mode(), self._autocast():
            pooled, logits = self.module.forward_both(self._input(y))
            clip = (
                self._torch.sigmoid(logits.float()).cpu().numpy().astype(np.float32)
                if want_clip and logits is not None
                else None
            )
        return pooled.float().cpu().numpy().astype(np.float32, copy=False), clip

    def embed(self, segments: np.ndarray) -> np.ndarray:
        return self._run(segments, False)[0]

    def outputs(self, segments: np.ndarray) -> dict[str, np.ndarray]:
        if self.labels is None:
            raise BackboneError(f"{self.spec.name}: {self.path} has no classification head, so no 'clipwise' output")
        emb, clip = self._run(segments, True)
        return {"embedding": emb, "clipwise": clip}

    def output_labels(self, name: str) -> list[str]:
        if name != "clipwise" or self.labels is None:
            raise KeyError(name)
        return list(self.labels)

    def torch_module(self):
        return self.module


def load(spec: BackboneSpec, checkpoint: str | None = None, max_length: int | None = None, **_) -> AST:
    """Load an AST from a directory or hub id; ``max_length`` (frames) overrides the input size."""
    from ..errors import require

    require("transformers", REQUIRES, "the AST backbone")
    d = resolve_model_dir(checkpoint)
    cfg, files = _check_dir(d)
    from transformers import ASTFeatureExtractor, ASTForAudioClassification, ASTModel
    from transformers.utils import logging as hf_logging

    has_head = "ASTForAudioClassification" in (cfg.get("architectures") or [])
    bar = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # no per-load progress bars on the CLI's stderr
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            # The reference extractor's 128-band Kaldi filterbank has an all-zero band: expected.
            warnings.simplefilter("ignore")
            fe = ASTFeatureExtractor.from_pretrained(d, local_files_only=True)
            cls = ASTForAudioClassification if has_head else ASTModel
            model, info = cls.from_pretrained(d, local_files_only=True, output_loading_info=True)
    except Exception as exc:
        raise ModelLoadingError(f"{d}: cannot load the AST weights ({first_line(exc, 200)})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    missing = list(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = (
            f"{len(missing)} tensors missing (e.g. {sorted(missing)[0]})"
            if missing
            else f"shape mismatch ({sorted(mismatched)[0]})"
        )
        raise ModelLoadingError(f"{d}: weights do not match config.json: {what}")
    base = model.audio_spectrogram_transformer if has_head else model
    head = model.classifier if has_head else None
    if fe.num_mel_bins != base.config.num_mel_bins or fe.max_length != base.config.max_length:
        raise ModelLoadingError(
            f"{d}: preprocessor_config.json ({fe.num_mel_bins} mels, {fe.max_length} frames) does not match config.json ({base.config.num_mel_bins}, {base.config.max_length})"
        )
    max_length = max_length or MAX_LENGTH.get(spec.name) or base.config.max_length
    if max_length != base.config.max_length:
        _resize_time_positions(base, max_length)
        fe.max_length = max_length
    labels = None
    if has_head:
        id2label = model.config.id2label
        labels = [id2label[i] for i in range(len(id2label))]
    out_spec = replace(
        spec,
        sample_rate=int(fe.sampling_rate),
        embedding_dim=int(base.config.hidden_size),
        frontend={**spec.frontend, "n_mels": fe.num_mel_bins, "max_length": max_length},
        outputs=("clipwise",) if has_head else (),
    )
    module = _waveform_module(base, head, fe)
    wid = dir_sha256(d, files)[:12]
    return AST(out_spec, module, labels, wid, max_length, d)


def write_random_model(path: str | Path, seed: int = 0, tiny: bool = True, classifier: bool = True, **config) -> Path:
    """Save a seeded random AST (``save_pretrained`` layout, with its feature extractor) for tests
    and benchmarks. tiny: 2 layers of width 32 (fast); else the real AST-base size (~87 M params).
    classifier: add a 527-way AudioSet head (labels from the packaged AudioSet list)."""
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification, ASTModel

    from .panns import audioset_labels

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if tiny else {}
    kw.update(config)
    if classifier:
        names = audioset_labels()
        kw.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    cfg = ASTConfig(**kw)
    with torch.random.fork_rng():  # seeded without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        model = (ASTForAudioClassification if classifier else ASTModel)(cfg).eval()
        with torch.no_grad():  # tokens/positions start at zero: randomise so every input matters
            base = model.audio_spectrogram_transformer if classifier else model
            for p in (
                base.embeddings.cls_token,
                base.embeddings.distillation_token,
                base.embeddings.position_embeddings,
            ):
                p.normal_(0.0, 0.02)
    path = Path(path)
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(path)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ASTFeatureExtractor(max_length=cfg.max_length, num_mel_bins=cfg.num_mel_bins).save_pretrained(path)
    return path


register_backbone(SPEC, load)
register_backbone(SPEC_5S, load)
