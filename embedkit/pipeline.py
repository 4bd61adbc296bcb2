"""`embedkit run`: the main job, from a folder of clips to the comparison report.

    extract (each backbone, resumable store)  ->  fit every head on each store
    ->  train the scratch CNN  ->  (optionally) fine-tune a backbone  ->  report

Every run this job makes lives in ``runs/<kind>-<name>-<config hash>/``: the hash covers the
dataset (track ids, paths, labels, splits, groups), the protocol, the preprocessing and the
trainer's settings, so a second invocation with the same inputs finds the finished runs (their
``metrics.json`` exists) and only rebuilds the report, and any change makes new runs beside
the old ones. Embeddings are cached by the extraction store, CNN inputs by the CNN's caches,
and an interrupted CNN run resumes from its last epoch.

``demo`` as the data argument uses ``../shared/data/gtzan_mini`` when present, else writes a
small generated labelled set (``embedkit.synth``) that the report marks as synthetic.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from .cnn import recipe as cnn_recipe
from .cnn.augment import AugmentConfig
from .cnn.features import FeatureConfig
from .cnn.loop import TrainConfig
from .config import AudioConfig, PreprocessConfig, SegmentConfig
from .errors import ConfigError, EmbedkitError
from .fusion import head_run_name
from .runs import check_cv, dataset_fingerprint, run_id  # noqa: F401  (run_id: the pipeline's run names)

# musicnn-msd + melstats fused (concat + lr): the best head over five 5-fold splits of
# gtzan_mini (0.940 against 0.928 for musicnn-msd alone; bench/bench_fused.py repeat), from the
# two stores the run extracts anyway (seconds more)
DEFAULT_BACKBONES = ("musicnn-msd", "melstats", "musicnn-msd+melstats")
QUICK_BACKBONES = ("tiny-test", "melstats")
HEADS = ("lr", "lgbm", "mlp")
# heads whose hyper-parameters `run` searches (fit's --search): the MLP, 0.944 with against 0.934
# without on musicnn-msd (five 5-fold splits; bench/bench_fused.py repeat); a few seconds a run
SEARCH_HEADS = ("mlp",)

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunPlan:
    """What `embedkit run` does. Defaults are sized for a laptop CPU (2 cores: gtzan_mini,
    100 clips, 5-fold CV, in about 8.5 minutes, 7.5 of them the scratch CNN's folds and final model).

    cv: K of stratified K-fold CV; 0 uses the dataset's own split when it has one, else a
        holdout of ``test_size``.
    backbones / heads: every head is trained on every backbone (a name A+B: fused);
        search_heads: the heads whose hyper-parameters are searched (``fit_head(search=True)``).
    cnn_train: the scratch CNN's training config (its seed and segment length are the plan's).
    cnn_augment: which augmentations the scratch CNN uses (see ``embedkit.cnn.augment``);
        cnn_augment_config: their ranges (its ``enabled`` is replaced by cnn_augment's).
    cnn_features / cnn_channels: the CNN's log-mel front end and filters per conv block.
        The cnn_* defaults are the best measured recipe (``cnn/recipe.py``, where the
        measurement is told).
    finetune: backbone to fine-tune end to end (None: no fine-tuning).
    finetune_train: its training config (frozen epochs: a third of the epochs, 1 to 3). No
        validation part, as the CNN: 0.91 +/- 0.04 on gtzan_mini against 0.90 +/- 0.05 with
        early stopping on 15 % of each training part (within noise; the frozen musicnn-msd
        head is 0.93 on the same folds).
    clip_s / segment_s: every clip is brought to clip_s and cut into segment_s windows.
    device / allow_tf32: where extraction and training run (``embedkit.device``; "auto": an
        accelerator when there is one). Not part of any run id or store key: a run made on one
        device is reused on another. Extraction batches follow the device's batch policy.
    """

    backbones: tuple[str, ...] = DEFAULT_BACKBONES
    heads: tuple[str, ...] = HEADS
    search_heads: tuple[str, ...] = SEARCH_HEADS
    cv: int = 5
    test_size: float = 0.2
    seed: int = 0
    cnn: bool = True
    # the measured recipe (cnn/recipe.py), the same as train_cnn's and `embedkit train-cnn`'s defaults
    cnn_train: TrainConfig = TrainConfig(**cnn_recipe.TRAIN)
    cnn_augment: str = cnn_recipe.AUGMENT
    cnn_augment_config: AugmentConfig = AugmentConfig()
    cnn_features: FeatureConfig = FeatureConfig(**cnn_recipe.FEATURES)
    cnn_channels: tuple[int, ...] = cnn_recipe.CHANNELS
    finetune: str | None = None
    finetune_train: TrainConfig = TrainConfig(epochs=10, val_size=0.0)
    clip_s: float = 30.0
    segment_s: float = 5.0
    quick: bool = False
    device: str = "cpu"
    allow_tf32: bool = False

    @classmethod
    def quick_plan(cls, **overrides) -> "RunPlan":
        """Smoke-test settings: random-weight tiny backbone + melstats, 2 folds, 10 s clips,
        a 2-epoch CNN without augmentation."""
        base = cls(
            backbones=QUICK_BACKBONES,
            cv=2,
            cnn_train=TrainConfig(epochs=2, patience=2, crops_per_clip=1, lr_schedule="cosine"),
            cnn_augment="none",
            finetune_train=TrainConfig(epochs=2, patience=2),
            search_heads=(),
            clip_s=10.0,
            quick=True,
        )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    @classmethod
    def from_options(
        cls, *, quick: bool = False, cnn_epochs: int | None = None, finetune: bool | str = False, **overrides
    ) -> "RunPlan":
        """The plan `embedkit run`'s options describe: the default plan (``quick``: the
        smoke-test plan) with the fields in ``overrides`` that are not None; cnn_epochs: the
        scratch CNN's epoch budget; finetune: a backbone to fine-tune, or True for the first of
        the plan's backbones that is not melstats."""
        over = {k: v for k, v in overrides.items() if v is not None}
        plan = cls.quick_plan(**over) if quick else replace(cls(), **over)
        if cnn_epochs is not None:
            if cnn_epochs < 1:
                raise ConfigError("cnn_epochs must be >= 1", field="cnn_epochs")
            plan = replace(plan, cnn_train=replace(plan.cnn_train, epochs=cnn_epochs))
        if finetune:
            ft = finetune if isinstance(finetune, str) else next((b for b in plan.backbones if b != "melstats"), None)
            if ft is None:
                raise ConfigError(
                    "finetune needs a pretrained backbone: pass --finetune-backbone NAME", field="finetune"
                )
            plan = replace(plan, finetune=ft)
        return plan

    def train_config(self, which: str) -> TrainConfig:
        """The ``cnn`` or ``finetune`` TrainConfig with the plan's seed and segment length."""
        base = self.cnn_train if which == "cnn" else self.finetune_train
        return replace(base, seed=self.seed, segment_s=self.segment_s)

    def validate(self) -> None:
        from .backbones import get_spec
        from .backbones.fused import is_fused, parse_parts

        for b in self.backbones:
            parse_parts(b) if is_fused(b) else get_spec(b)  # unknown name -> BackboneError listing the valid ones
        bad = [h for h in self.heads if h not in HEADS]
        if bad:
            raise ConfigError(f"unknown head {bad[0]!r}; choose from {', '.join(HEADS)}", field="heads")
        if not self.backbones and not self.cnn and not self.finetune:
            raise ConfigError("nothing to run: no backbones, no CNN and no fine-tuning")
        if self.cv:  # 0: the dataset split / a holdout
            check_cv(self.cv)
        if not 0 < self.test_size < 1:
            raise ConfigError("test_size must be between 0 and 1", field="test_size")
        if self.clip_s < self.segment_s:
            raise ConfigError(
                f"clip length {self.clip_s:g} s is shorter than one {self.segment_s:g} s segment", field="clip_s"
            )
        self.train_config("cnn").validate()
        self.train_config("finetune").validate()

    @property
    def prep(self) -> PreprocessConfig:
        return PreprocessConfig(AudioConfig(clip_s=self.clip_s), SegmentConfig(self.segment_s, self.segment_s))

    @property
    def protocol(self) -> dict[str, Any]:
        return {"cv": self.cv or None, "test_size": self.test_size, "seed": self.seed}


@dataclass
class RunOutcome:
    run_dir: Path
    kind: str
    name: str
    reused: bool
    seconds: float  # wall time this invocation spent on it (0 when reused)
    metrics: dict[str, Any]


@dataclass
class PipelineResult:
    data: str
    synthetic: bool
    runs: list[RunOutcome] = field(default_factory=list)
    extraction: dict[str, dict[str, Any]] = field(default_factory=dict)
    report: Path | None = None
    seconds: float = 0.0
    tracks: pd.DataFrame | None = None  # the track table the runs used


# ---------------------------------------------------------------------------------------------
# Data


def shared_candidates() -> list[Path]:
    """Where ``../shared/data/gtzan_mini`` may be: $EMBEDKIT_SHARED, beside the working
    directory, beside the source checkout."""
    out = []
    if os.environ.get("EMBEDKIT_SHARED"):
        out.append(Path(os.environ["EMBEDKIT_SHARED"]) / "data" / "gtzan_mini")
    out.append(Path.cwd().parent / "shared" / "data" / "gtzan_mini")
    out.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "gtzan_mini")
    return out


def demo_data(
    cache: str | os.PathLike, n_classes: int = 6, per_class: int = 10, duration_s: float = 30.0
) -> tuple[Path, bool]:
    """(dataset folder, synthetic?): gtzan_mini when present, else a generated set in the cache."""
    for p in shared_candidates():
        if p.is_dir():
            return p, False
    from .synth import make_dataset

    root = Path(cache) / "demo-synthetic" / f"{n_classes}x{per_class}x{duration_s:g}s"
    return make_dataset(root, n_classes=n_classes, per_class=per_class, duration_s=duration_s), True


def load_tracks(
    data: str | os.PathLike | None,
    cache: str | os.PathLike,
    audio_dir=None,
    subset: str = "small",
    demo_size: tuple[int, int, float] | None = None,
    labels_from_tags=None,
) -> tuple[pd.DataFrame, bool]:
    """The track table of ``data`` ('demo' or None: see ``demo_data``), with
    ``attrs['synthetic']`` set for generated sets (a folder made by embedkit.synth carries a
    SYNTHETIC marker file). labels_from_tags: a ``taxonomy.TagLabels`` (``datasets.from_tags``)."""
    from .datasets import load_dataset

    synthetic = False
    if data is None or str(data) == "demo":
        data, synthetic = demo_data(cache, *(demo_size or ()))
    tracks = load_dataset(data, audio_dir=audio_dir, subset=subset, labels_from_tags=labels_from_tags)
    p = Path(data)
    synthetic = synthetic or (p.is_dir() and (p / "SYNTHETIC").exists())
    tracks.attrs["synthetic"] = bool(synthetic)
    return tracks, bool(synthetic)


def _finished(run_dir: Path) -> dict[str, Any] | None:
    f = run_dir / "metrics.json"
    if not f.exists():
        return None
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, OSError):
        return None  # torn or unreadable: redo the run


# ---------------------------------------------------------------------------------------------
# Stages


def extract_stage(
    tracks: pd.DataFrame, backbone: str, plan: RunPlan, cache: Path, workers: int | None, log: Log
) -> dict[str, Any]:
    from .backbones.fused import is_fused

    if is_fused(backbone):  # each part's store, extracted (or found cached) like a single backbone's
        from .fusion import FusedStores, parse_parts

        parts = {p: extract_stage(tracks, p, plan, cache, workers, log) for p in parse_parts(backbone)}
        costs = [e["extract_seconds"] for e in parts.values()]
        ms = [e["extract_ms_per_track"] for e in parts.values()]
        return {
            "store": FusedStores(list(parts), [e["store"] for e in parts.values()]),
            "n_extracted": sum(e["n_extracted"] for e in parts.values()),
            "n_cached": sum(e["n_cached"] for e in parts.values()),
            "n_failed": sum(e["n_failed"] for e in parts.values()),
            "seconds": sum(e["seconds"] for e in parts.values()),
            "extract_ms_per_track": None if None in ms else sum(ms),
            "extract_seconds": None if None in costs else sum(costs),
        }
    from .extract import extract

    t0 = time.perf_counter()
    res = extract(
        tracks,
        backbone,
        cache=cache,
        prep=plan.prep,
        workers=workers,
        device=plan.device,
        allow_tf32=plan.allow_tf32,
        batch_size=None,
    )
    wall = time.perf_counter() - t0
    from .fit import extraction_cost

    cost = extraction_cost(res.store)  # extract() accumulates it in the store
    ms = cost["ms_per_track"] if cost else None
    log(
        f"extract {backbone}: {res.n_extracted} tracks extracted, {res.n_skipped} cached, {res.n_failed} failed ({wall:.1f} s)"
    )
    for f in res.failures[:5]:
        log(f"  skipped {f['path']}: {f['reason']}")
    if res.nothing_done:  # jobs.JobResult's rule, the one `embedkit extract` exits on
        raise EmbedkitError(f"{backbone}: no track could be extracted")
    return {
        "store": res.store,
        "n_extracted": res.n_extracted,
        "n_cached": res.n_skipped,
        "n_failed": res.n_failed,
        "seconds": wall,
        "extract_ms_per_track": ms,
        "extract_seconds": ms * len(tracks) / 1000 if ms is not None else None,
    }


@dataclass(eq=False)
class DatasetId:
    """The fingerprint of the pipeline's dataset (``runs.dataset_fingerprint``) that its run ids
    hash, and, computed the first time it is asked for, the one runs finished before BLAKE3
    fingerprints have (the same table fingerprinted in identity.LEGACY, SHA-256)."""

    tracks: pd.DataFrame
    current: str
    _legacy: str | None = None

    def legacy(self) -> str:
        if self._legacy is None:
            from .identity import LEGACY, with_fingerprints

            self._legacy = dataset_fingerprint(with_fingerprints(self.tracks, scheme=LEGACY))
        return self._legacy


def _run_dir(runs: Path, kind: str, name: str, identity: dict[str, Any], ds: DatasetId) -> Path:
    """The folder of the run with this identity: the current one, or the same run finished
    before BLAKE3 fingerprints (its dataset hashed in SHA-256), which is reused rather than
    made again. The SHA-256 pass is only paid when the current run is not finished and a
    finished run of the same kind and name exists."""
    run_dir = runs / run_id(kind, name, {**identity, "dataset": ds.current})
    prefix = run_dir.name.rsplit("-", 1)[0]
    if _finished(run_dir) is not None or not any(runs.glob(f"{prefix}-*/metrics.json")):
        return run_dir
    old = runs / run_id(kind, name, {**identity, "dataset": ds.legacy()})
    return old if _finished(old) is not None else run_dir


def _patch_metrics(run_dir: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Add pipeline-known facts (extraction cost, synthetic flag) to a run's metrics.json."""
    from .io import atomic_write_text

    f = run_dir / "metrics.json"
    m = json.loads(f.read_text())
    changed = False
    for k, v in extra.items():
        if k == "dataset":
            d = dict(m.get("dataset") or {})
            for dk, dv in v.items():
                if d.get(dk) != dv:
                    d[dk], changed = dv, True
            m["dataset"] = d
        elif v is not None and m.get(k) != v:
            m[k], changed = v, True
    if changed:
        atomic_write_text(f, json.dumps(m, indent=2))
    return m


def head_stage(
    tracks: pd.DataFrame,
    backbone: str,
    head: str,
    ext: dict[str, Any],
    plan: RunPlan,
    runs: Path,
    fp: DatasetId,
    log: Log,
    threads: int | None,
    folds=None,
) -> RunOutcome:
    identity = {
        "kind": "head",
        "backbone": backbone,
        "head": head,
        "dataset": fp.current,
        "protocol": plan.protocol,
        "prep": plan.prep.to_dict(),
        "weights": ext["store"].root.name,
        "search": head in plan.search_heads,
    }
    name = head_run_name(backbone, head)
    run_dir = _run_dir(runs, "head", name, identity, fp)
    extra = {
        "extract_ms_per_track": ext["extract_ms_per_track"],
        "extract_seconds": ext["extract_seconds"],
        "dataset": {"synthetic": bool(tracks.attrs.get("synthetic"))},
    }
    done = _finished(run_dir)
    if done is not None:
        log(f"fit {name}: reused {run_dir}")
        return RunOutcome(run_dir, "head", name, True, 0.0, _patch_metrics(run_dir, extra))
    t0 = time.perf_counter()
    fit_head_run(tracks, ext["store"], backbone, head, plan, run_dir, name, threads, folds)
    m = _patch_metrics(run_dir, extra)
    log(f"fit {name}: track accuracy {m['track_accuracy']:.3f} ({time.perf_counter() - t0:.1f} s)")
    return RunOutcome(run_dir, "head", name, False, time.perf_counter() - t0, m)


def fit_head_run(
    tracks: pd.DataFrame,
    store,
    backbone: str,
    head: str,
    plan: RunPlan,
    run_dir: Path,
    name: str,
    threads: int | None,
    folds=None,
) -> dict[str, Any]:
    """One head on one store, evaluated with the plan's protocol (on ``folds`` when given);
    writes run_dir/metrics.json."""
    from .fit import fit_head

    res = fit_head(
        backbone,
        head,
        store=store,
        tracks=tracks,
        run_dir=run_dir,
        name=name,
        protocol="auto",
        cv=plan.cv or None,
        test_size=plan.test_size,
        seed=plan.seed,
        search=head in plan.search_heads,
        threads=threads,
        folds=folds,
    )
    return res.metrics


def _trainer_options(plan: RunPlan, folds, cache: Path, threads, workers, progress) -> dict[str, Any]:
    """The keyword arguments the pipeline passes alike to train_cnn and finetune."""
    return {
        "cv": plan.cv or None,
        "test_size": plan.test_size,
        "folds": folds,
        "cache": cache,
        "threads": threads,
        "workers": workers,
        "progress": progress,
        "device": plan.device,
        "allow_tf32": plan.allow_tf32,
    }


def cnn_stage(
    tracks: pd.DataFrame,
    plan: RunPlan,
    runs: Path,
    cache: Path,
    fp: DatasetId,
    log: Log,
    threads,
    workers,
    progress,
    folds=None,
) -> RunOutcome:
    from .cnn.train import train_cnn

    train = plan.train_config("cnn")
    aug = replace(plan.cnn_augment_config, enabled=AugmentConfig.parse(plan.cnn_augment).enabled)
    audio = AudioConfig(clip_s=plan.clip_s)
    common = _trainer_options(plan, folds, cache, threads, workers, progress)
    identity = {
        "kind": "cnn",
        "dataset": fp.current,
        "protocol": plan.protocol,
        "train": asdict(train),
        "augment": aug.to_dict(),
        "audio": asdict(audio),
        "features": asdict(plan.cnn_features),
        "channels": list(plan.cnn_channels),
    }
    return _trained(
        "cnn",
        "cnn-scratch",
        identity,
        fp,
        runs,
        tracks,
        log,
        lambda run_dir, resume: train_cnn(
            tracks,
            train=train,
            channels=plan.cnn_channels,
            features=plan.cnn_features,
            audio_cfg=audio,
            augment=aug,
            run_dir=run_dir,
            resume=resume,
            **common,
        ),
    )


def finetune_stage(
    tracks: pd.DataFrame,
    backbone: str,
    plan: RunPlan,
    runs: Path,
    cache: Path,
    fp: DatasetId,
    log: Log,
    threads,
    workers,
    progress,
    folds=None,
) -> RunOutcome:
    from .cnn.augment import AugmentConfig
    from .cnn.finetune import FinetuneConfig, finetune

    train, aug = plan.train_config("finetune"), AugmentConfig.parse("none")
    ft = FinetuneConfig(backbone, frozen_epochs=min(3, max(1, train.epochs // 3)))  # unfreeze: default_unfreeze
    audio = AudioConfig(clip_s=plan.clip_s)
    common = _trainer_options(plan, folds, cache, threads, workers, progress)
    identity = {
        "kind": "finetune",
        "backbone": backbone,
        "dataset": fp.current,
        "protocol": plan.protocol,
        "train": asdict(train),
        "finetune": asdict(ft),
        "audio": asdict(audio),
    }
    return _trained(
        "finetune",
        f"finetune-{backbone}",
        identity,
        fp,
        runs,
        tracks,
        log,
        lambda run_dir, resume: finetune(
            tracks, backbone, train=train, ft=ft, audio_cfg=audio, augment=aug, run_dir=run_dir, resume=resume, **common
        ),
    )


def _trained(
    kind: str, name: str, identity: dict, fp: DatasetId, runs: Path, tracks: pd.DataFrame, log: Log, train_fn
) -> RunOutcome:
    run_dir = _run_dir(runs, kind, name, identity, fp)
    extra = {"dataset": {"synthetic": bool(tracks.attrs.get("synthetic"))}}
    done = _finished(run_dir)
    if done is not None:
        log(f"{kind} {name}: reused {run_dir}")
        return RunOutcome(run_dir, kind, name, True, 0.0, _patch_metrics(run_dir, extra))
    resume = (run_dir / "run.json").exists()  # interrupted earlier: continue from the checkpoints
    log(f"{kind} {name}: {'resuming' if resume else 'training'} in {run_dir}")
    t0 = time.perf_counter()
    train_fn(run_dir, resume)
    m = _patch_metrics(run_dir, extra)
    log(f"{kind} {name}: track accuracy {m['track_accuracy']:.3f} ({time.perf_counter() - t0:.1f} s)")
    return RunOutcome(run_dir, kind, name, False, time.perf_counter() - t0, m)


# ---------------------------------------------------------------------------------------------


def run_all(
    data: str | os.PathLike | None = "demo",
    plan: RunPlan = RunPlan(),
    *,
    cache: str | os.PathLike = "cache",
    runs: str | os.PathLike = "runs",
    report: str | os.PathLike | None = "reports/report.html",
    audio_dir: str | os.PathLike | None = None,
    subset: str = "small",
    workers: int | None = None,
    threads: int | None = None,
    log: Log | None = None,
    progress: Callable[[dict], None] | None = None,
    demo_size: tuple[int, int, float] | None = None,
    labels_from_tags=None,
) -> PipelineResult:
    """Run the whole comparison on ``data`` and write the report; see the module doc.

    log: receives one line per stage. progress: the CNN trainers' event callback.
    demo_size: (classes, clips per class, seconds) of a generated demo set (tests use tiny ones).
    labels_from_tags: a ``taxonomy.TagLabels``: DATA is a music folder labelled by its files'
    genre tags (``datasets.from_tags``); ``result.tracks`` is the track table (its attrs list the
    untagged files: the ones to tag next).
    Returns the outcome of every run (new or reused) and the report path (None if report=None).
    """
    plan.validate()
    log = log or (lambda s: None)
    cache, runs = Path(cache), Path(runs)
    t0 = time.perf_counter()
    tracks, synthetic = load_tracks(data, cache, audio_dir, subset, demo_size, labels_from_tags)
    from .identity import with_fingerprints

    tracks = with_fingerprints(tracks)  # once: every stage and the run ids see the same contents
    source = tracks.attrs.get("source", str(data))
    log(
        f"data: {source}: {len(tracks)} tracks, {tracks['label'].nunique()} classes"
        + (" (SYNTHETIC)" if synthetic else "")
    )
    # The folds, made once (an impossible protocol fails before any expensive work) and handed
    # to every approach, so heads, the CNN and fine-tuning are evaluated on the same test parts.
    from .evaluate import make_folds
    from .runs import choose_protocol

    folds = make_folds(tracks, choose_protocol(tracks, plan.cv or None), plan.cv or 5, plan.test_size, plan.seed)
    fp = DatasetId(tracks, dataset_fingerprint(tracks))
    result = PipelineResult(str(source), synthetic, tracks=tracks)
    # Every run this plan makes, in order: the report is written as soon as the first one is
    # done and rewritten (atomically) after each later one, naming those still in progress, so
    # a newcomer sees the heads' results in minutes while the CNN trains.
    planned = (
        [head_run_name(b, h) for b in plan.backbones for h in plan.heads]
        + (["cnn-scratch"] if plan.cnn else [])
        + ([f"finetune-{plan.finetune}"] if plan.finetune else [])
    )
    title = f"embedkit comparison: {Path(str(source)).name}" + (" (synthetic data)" if synthetic else "")

    def add(outcome: RunOutcome) -> None:
        result.runs.append(outcome)
        if report is not None:
            from .report import build_report

            pending = planned[len(result.runs) :]
            result.report, _ = build_report([r.run_dir for r in result.runs], report, title=title, pending=pending)
            log(f"report: {result.report}" + (f" ({len(pending)} run(s) still in progress)" if pending else ""))

    for backbone in plan.backbones:
        ext = extract_stage(tracks, backbone, plan, cache, workers, log)
        result.extraction[backbone] = {k: v for k, v in ext.items() if k != "store"}
        for head in plan.heads:
            add(head_stage(tracks, backbone, head, ext, plan, runs, fp, log, threads, folds))
    if plan.cnn:
        add(cnn_stage(tracks, plan, runs, cache, fp, log, threads, workers, progress, folds))
    if plan.finetune:
        add(finetune_stage(tracks, plan.finetune, plan, runs, cache, fp, log, threads, workers, progress, folds))
    result.seconds = time.perf_counter() - t0
    return result
