"""Confidence that means what it says: calibration, thresholds and decisions.

A run's track probabilities (the mean of its segment probabilities) are often over- or
under-confident. ``fit_calibration`` fits temperature scaling (Guo et al., 2017) on held-out
track probabilities: ``p' = softmax(log p / T)`` with the one scalar T that minimises the
negative log-likelihood. T changes confidence, never the ranking of the classes, so accuracy is
unchanged. It is kept only when it can be fitted (``MIN_FIT_TRACKS`` held-out tracks, at least
one of them wrong) and lowers the NLL on held-out tracks; else the run's calibration is the
identity ("none"). (Isotonic regression of the top-class confidence was measured too and was
worse on every gtzan_mini run: bench/bench_calibration.py.)

Scores, on track-level probabilities P [N, C] and true class indices y [N]:
- ECE: expected calibration error over ``ECE_BINS`` (15) equal-width bins of the top-class
  confidence: sum_b (n_b / N) |accuracy_b - mean confidence_b|.
- NLL: mean of -log p[true] (probabilities clipped at 1e-12).
- Brier: mean over tracks of sum_c (p_c - [c == true])^2 (0 best, 2 worst).

``calibrate_run(ev, run_dir)`` is the one call every trainer makes when a run is finished: it
fits the calibration on the run's out-of-fold tracks and writes ``calibration.json``; the
before / after scores it returns for metrics.json are cross-fitted: the tracks of each fold are
scored with a temperature fitted on the other folds only (with a single test part, on 5
stratified chunks of it), so no track is scored by a calibration that saw it.

Decisions (``decide``): below ``threshold`` a track is "uncertain" (no genre, probabilities
still reported); with ``multi`` every genre at or above ``multi_threshold`` or within
``margin`` of the top one is kept, at most ``k``. The default threshold is chosen from the run's
own held-out data by ``select_threshold``: the smallest threshold whose tagged tracks reach the
target precision (accuracy among the tracks at or above it), see its docstring; on fewer
than ``MIN_THRESHOLD_TRACKS`` held-out tracks none is chosen (0).

"Not music" (``NotMusicDetector``, ``fit_not_music``): a track unlike anything the model was
trained on (speech, noise, tones, hum) gets a score, the mean over its windows of each window's
squared Mahalanobis distance (divided by the dimension) to the training windows in the model's
own embedding space (the head's input for head runs, the penultimate layer of the scratch CNN,
the fine-tuned backbone's output), on a signed-log scale with a shrunk covariance. The threshold
(``DecisionRule.not_music``) is chosen on held-out training tracks: each CV fold's tracks (without CV folds: each of
``NOT_MUSIC_PARTS`` interleaved parts of all the tracks) are scored against the other parts'
windows only, and the threshold is the ``NOT_MUSIC_QUANTILE`` quantile of those held-out music
scores times ``NOT_MUSIC_MARGIN`` (bench/bench_notmusic.py measured this choice and the
alternatives). At or above it the decision is ``NOT_MUSIC`` (no genre; nothing is written into the
file). A run without a stored threshold (made before it existed) never decides "not-music".

The embedding score alone misses stationary noise (quiet white / pink / brown noise sat just below
its threshold: a backbone's log compression maps quiet noise near quiet music). So a detector
fitted with the training tracks' audio also reads the window's waveform: its *modulation depth*
(``modulation_depth``: the median over 16 log-spaced bands of the standard deviation over 0.25 s
blocks of the band level in dB; music moves by ~2-30 dB, noise ~0.6 dB, tones and hum ~0). A
window's score is then ``max(m, m_ref * min(d_ref / d, cap))``: the Mahalanobis score m, or the
stationarity ratio in the embedding score's units, where ``d_ref`` is the 1 % quantile of the
training windows' depth and ``m_ref`` the 99 % quantile of the held-out embedding scores (so the
second term reaches the embedding's threshold exactly when a window is as stationary as the 1 %
stillest training music). The threshold is again the 99 % quantile of the held-out music tracks'
(combined) scores. Windows too quiet to measure (below ``NOT_MUSIC_GATE_DB``: digital silence,
zero padding) leave the embedding score alone. Without training audio at fit time the detector
is the embedding score alone, with the reason in ``fitted_on["modulation"]`` (as for detectors
made before the modulation term: ``NotMusicDetector.modulation_note``).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import CalibrationError, EmbedkitError, first_line

CALIBRATION_FILE = "calibration.json"
ECE_BINS = 15
EPS = 1e-12
#: precision the default threshold aims for on the run's held-out tracks.
TARGET_PRECISION = 0.97
#: fewest held-out tracks the default threshold must leave tagged (so one lucky track cannot
#: set it).
MIN_TAGGED = 10
#: fewest held-out tracks a default threshold is chosen on (fewer: threshold 0).
MIN_THRESHOLD_TRACKS = 20
#: fewest held-out tracks a temperature is fitted on; and at least one must be misclassified:
#: on tracks that are all right the NLL keeps falling as T -> 0 (certainty), a useless fit.
MIN_FIT_TRACKS = 20
#: temperature search range; T outside it means the probabilities carry no usable ranking.
T_BOUNDS = (0.01, 100.0)
UNCERTAIN = "uncertain"
#: the decision for audio unlike the model's training music (not a genre, not "uncertain")
NOT_MUSIC = "not-music"
#: covariance shrinkage of the not-music detector; embeddings wider than this are projected
#: onto their top principal directions first
NOT_MUSIC_SHRINKAGE = 0.1
NOT_MUSIC_MAX_DIM = 256
#: the not-music threshold: this quantile of the held-out music tracks' scores, times the margin
NOT_MUSIC_QUANTILE = 0.99
NOT_MUSIC_MARGIN = 1.0
#: parts the tracks of a run without CV folds are held out in, one part at a time
NOT_MUSIC_PARTS = 5
#: the modulation term (``modulation_depth``): the training windows' depth quantile it is
#: referred to, the cap of the ratio (tones and hum have depth ~0), the level (dB re full scale)
#: under which a 0.25 s block is not measured, and the most training tracks decoded for it
NOT_MUSIC_DEPTH_QUANTILE = 0.01
NOT_MUSIC_DEPTH_CAP = 4.0
NOT_MUSIC_GATE_DB = -60.0
NOT_MUSIC_DEPTH_TRACKS = 400
#: modulation depth analysis: frame ~64 ms (a power of two), half overlap; blocks of 0.25 s;
#: 16 log-spaced bands from 60 Hz to 7 kHz (or 0.45 x the sample rate)
_DEPTH_FRAME_S, _DEPTH_BLOCK_S, _DEPTH_BANDS, _DEPTH_FMIN, _DEPTH_FMAX = 0.064, 0.25, 16, 60.0, 7000.0


# ---------------------------------------------------------------------------------------------
# Scores


def _check(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y, dtype=int)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"expected probabilities [N, C] and labels [N], got {p.shape} and {y.shape}")
    return p, y


def reliability(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per equal-width bin of the top-class confidence: {lo, hi, n, confidence, accuracy}
    (confidence and accuracy None in empty bins). The last bin includes 1.0."""
    p, y = _check(p, y)
    conf = p.max(axis=1)
    right = (p.argmax(axis=1) == y).astype(float)
    idx = np.minimum((conf * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        n = int(m.sum())
        out.append(
            {
                "lo": b / bins,
                "hi": (b + 1) / bins,
                "n": n,
                "confidence": float(conf[m].mean()) if n else None,
                "accuracy": float(right[m].mean()) if n else None,
            }
        )
    return out


def ece(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``bins`` equal-width bins of the top-class confidence."""
    p, y = _check(p, y)
    if len(p) == 0:
        return float("nan")
    return float(sum(b["n"] * abs(b["accuracy"] - b["confidence"]) for b in reliability(p, y, bins) if b["n"]) / len(p))


def nll(p: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    p, y = _check(p, y)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], EPS, 1.0)).mean())


def brier(p: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over tracks of sum_c (p_c - onehot_c)^2, in [0, 2]."""
    p, y = _check(p, y)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(axis=1).mean())


def ece_if_calibrated(p: np.ndarray, draws: int = 200, seed: int = 0, bins: int = ECE_BINS) -> dict[str, float]:
    """The ECE a perfectly calibrated model with these confidences would show on this many
    tracks: labels drawn from ``p`` itself, ``draws`` times. {mean, p90}. On 100 tracks it is
    far from 0, so a measured ECE below its p90 is indistinguishable from perfect calibration."""
    p = np.asarray(p, dtype=np.float64)
    rng = np.random.default_rng(seed)
    cum = np.cumsum(p, axis=1)
    vals = []
    for _ in range(draws):
        u = rng.random((len(p), 1)) * cum[:, -1:]
        y = np.minimum((u > cum).sum(axis=1), p.shape[1] - 1)
        vals.append(ece(p, y, bins))
    return {"mean": float(np.mean(vals)), "p90": float(np.percentile(vals, 90)), "draws": draws}


def scores(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """{ece, nll, brier, accuracy} of track probabilities."""
    p, y = _check(p, y)
    return {"ece": ece(p, y), "nll": nll(p, y), "brier": brier(p, y), "accuracy": float((p.argmax(axis=1) == y).mean())}


# ---------------------------------------------------------------------------------------------
# Temperature scaling


def _softmax_t(p: np.ndarray, t: float) -> np.ndarray:
    z = np.log(np.clip(p, EPS, 1.0)) / t
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def can_fit_temperature(p: np.ndarray, y: np.ndarray) -> str:
    """ "" when a temperature can be fitted on (p, y), else the reason it cannot."""
    if len(y) < MIN_FIT_TRACKS:
        return f"only {len(y)} held-out tracks (temperature scaling needs {MIN_FIT_TRACKS})"
    if (np.asarray(p).argmax(axis=1) == np.asarray(y)).all():
        return "every held-out track is right: the fit would drive confidence to certainty"
    return ""


def fit_temperature(p: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the NLL of softmax(log p / T) on (p, y); bounded search on
    log T (the NLL is smooth and, for T > 0, has one minimum)."""
    from scipy.optimize import minimize_scalar

    p, y = _check(p, y)
    if len(p) == 0:
        raise ValueError("no tracks to fit a temperature on")
    lo, hi = np.log(T_BOUNDS[0]), np.log(T_BOUNDS[1])
    res = minimize_scalar(
        lambda lt: nll(_softmax_t(p, float(np.exp(lt))), y), bounds=(lo, hi), method="bounded", options={"xatol": 1e-4}
    )
    return float(np.exp(res.x))


@dataclass
class DecisionRule:
    """How probabilities become genres. threshold: top probability below it -> "uncertain".
    multi: keep more than the top genre: those >= multi_threshold or within ``margin`` of the
    top probability, at most ``k`` (the top one always, when it passes ``threshold``)."""

    threshold: float = 0.0
    multi: bool = False
    multi_threshold: float = 0.3
    margin: float = 0.1
    k: int = 3
    #: not-music score at or above which the decision is NOT_MUSIC (None: never)
    not_music: float | None = None

    def __post_init__(self):
        # plain Python values whatever the caller passed (numpy scalars, JSON): rules compare
        # and serialise exactly
        for name in ("threshold", "multi_threshold", "margin"):
            v = getattr(self, name)
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise CalibrationError(f"decision rule: {name} must be a number, got {v!r}")
            object.__setattr__(self, name, float(v))
        if not isinstance(self.multi, (bool, np.bool_)):
            raise CalibrationError(f"decision rule: multi must be true or false, got {self.multi!r}")
        self.multi = bool(self.multi)
        if isinstance(self.k, (bool, np.bool_)) or not isinstance(self.k, (int, np.integer)):
            raise CalibrationError(f"decision rule: max_genres (k) must be an integer, got {self.k!r}")
        self.k = int(self.k)
        if not 0.0 <= self.threshold <= 1.0:
            raise EmbedkitError(f"--threshold must be between 0 and 1, got {self.threshold}")
        if not 0.0 <= self.multi_threshold <= 1.0:
            raise EmbedkitError(f"the multi-genre threshold must be between 0 and 1, got {self.multi_threshold}")
        if not 0.0 <= self.margin <= 1.0:
            raise EmbedkitError(f"the multi-genre margin must be between 0 and 1, got {self.margin}")
        if self.k < 1:
            raise EmbedkitError(f"the multi-genre limit (max_genres) must be >= 1, got {self.k}")
        if self.not_music is not None:
            v = self.not_music
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise CalibrationError(f"decision rule: not_music must be a number or null, got {v!r}")
            if not (np.isfinite(v) and v >= 0):
                raise EmbedkitError(f"the not-music threshold must be >= 0, got {v}")
            self.not_music = float(v)

    def to_dict(self) -> dict[str, Any]:
        """The rule as stored with results (database rows, JSON records, exported models)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "DecisionRule":
        """Inverse of ``to_dict`` (``max_genres`` is accepted for ``k``); CalibrationError for
        unknown fields or values of the wrong type (a rule is never half-read)."""
        if d is not None and not isinstance(d, dict):
            raise CalibrationError(f"decision rule must be a mapping, got {d!r}")
        d = dict(d or {})
        if "max_genres" in d:
            d["k"] = d.pop("max_genres")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise CalibrationError(f"decision rule: unknown field(s) {', '.join(map(str, unknown))}")
        return cls(**d)

    def normal(self) -> "DecisionRule":
        """The rule with the multi-genre settings at their defaults when ``multi`` is off (they
        decide nothing then): two rules that decide alike compare equal in this form."""
        from dataclasses import replace

        if self.multi:
            return self
        d = DecisionRule()
        return replace(self, multi_threshold=d.multi_threshold, margin=d.margin, k=d.k)

    def with_overrides(
        self,
        threshold: float | None = None,
        multi: bool | None = None,
        multi_threshold: float | None = None,
        margin: float | None = None,
        max_genres: int | None = None,
        not_music: float | None = None,
    ) -> "DecisionRule":
        """This rule with a caller's overrides; None keeps the stored value. The one place where
        every door (CLI flags, HTTP query parameters, library arguments) turns its options into
        the rule applied, under the same names: ``threshold``, ``multi``, ``multi_threshold``,
        ``margin``, ``max_genres`` (the field ``k``), ``not_music``."""
        from dataclasses import replace

        over = {
            k: v
            for k, v in (
                ("threshold", threshold),
                ("multi", multi),
                ("multi_threshold", multi_threshold),
                ("margin", margin),
                ("k", max_genres),
                ("not_music", not_music),
            )
            if v is not None
        }
        return replace(self, **over) if over else self


#: the names of a rule's overrides at every door (CLI ``--multi-threshold`` <-> HTTP
#: ``?multi_threshold=`` <-> ``DecisionRule.with_overrides(multi_threshold=)``)
RULE_OPTIONS = ("threshold", "multi", "multi_threshold", "margin", "max_genres", "not_music")


def rule_of(calibration) -> DecisionRule:
    """The default decision rule a model's calibration carries (threshold 0 without one)."""
    return getattr(calibration, "rule", None) or DecisionRule()


@dataclass
class Decision:
    """label: the top genre or "uncertain"; genres: what would be written (empty when
    uncertain); scores: the calibrated probability of each of ``genres``; confidence: the top
    probability (recorded even when uncertain)."""

    label: str
    genres: list[str]
    scores: list[float]
    confidence: float
    #: the track's not-music score (None: the model has no detector)
    not_music: float | None = None

    @property
    def uncertain(self) -> bool:
        return self.label == UNCERTAIN

    @property
    def is_not_music(self) -> bool:
        return self.label == NOT_MUSIC

    def __str__(self) -> str:  # what a results row records as the decision
        return self.label


def decide(
    p: np.ndarray, labels: Sequence[str], rule: DecisionRule | None = None, not_music: float | None = None
) -> Decision:
    """Calibrated probabilities of one track [C] (and its not-music score, None when the model
    has no detector) -> Decision under ``rule``. The not-music test comes first: audio unlike
    the training music gets no genre however confident the classifier is."""
    rule = rule or DecisionRule()
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or len(p) != len(labels):
        raise ValueError(f"expected probabilities [{len(labels)}], got shape {p.shape}")
    order = np.argsort(-p, kind="stable")
    top = float(p[order[0]])
    nm = None if not_music is None else float(not_music)
    if rule.not_music is not None and nm is not None and nm >= rule.not_music:
        return Decision(NOT_MUSIC, [], [], top, nm)
    if top < rule.threshold:
        return Decision(UNCERTAIN, [], [], top, nm)
    keep = [int(order[0])]
    if rule.multi:
        for j in order[1:]:
            if len(keep) >= rule.k:
                break
            if p[j] >= rule.multi_threshold or p[j] >= top - rule.margin:
                keep.append(int(j))
    return Decision(str(labels[order[0]]), [str(labels[j]) for j in keep], [float(p[j]) for j in keep], top, nm)


@dataclass
class Calibration:
    """A fitted calibration of a run's track probabilities; ``apply`` maps [..., C] -> [..., C].

    method: "temperature" with ``temperature``, or "none" (the identity: chosen when temperature
    scaling did not lower the held-out NLL); labels: the class order it
    was fitted in; rule: the default decisions (threshold chosen on held-out data);
    fitted_on: what it was fitted on (number of tracks, protocol)."""

    labels: list[str]
    temperature: float = 1.0
    method: str = "temperature"
    rule: DecisionRule = field(default_factory=DecisionRule)
    fitted_on: dict[str, Any] = field(default_factory=dict)
    #: the not-music score of this model's embeddings (None: a run made before it existed)
    detector: "NotMusicDetector | None" = None

    @property
    def is_identity(self) -> bool:
        """True when ``apply`` leaves probabilities as they are (method "none", or T = 1)."""
        return self.method == "none" or self.temperature == 1.0

    def apply(self, p: np.ndarray) -> np.ndarray:
        """Probabilities [..., C] (rows summing to 1) -> calibrated probabilities [..., C]."""
        p = np.asarray(p, dtype=np.float64)
        if p.shape[-1] != len(self.labels):
            raise CalibrationError(
                f"calibration is for {len(self.labels)} classes, got probabilities with {p.shape[-1]}"
            )
        return p.copy() if self.is_identity else _softmax_t(p, self.temperature)

    def decide(self, p: np.ndarray, rule: DecisionRule | None = None) -> Decision:
        """Decision for one track's calibrated probabilities [C] (default: the stored rule)."""
        return decide(p, self.labels, rule or self.rule)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "method": self.method,
            "temperature": self.temperature,
            "labels": list(self.labels),
            "rule": asdict(self.rule),
            "fitted_on": self.fitted_on,
            "not_music": None if self.detector is None else self.detector.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        if not isinstance(d, dict) or d.get("method") not in ("temperature", "none"):
            raise CalibrationError(
                f"unknown calibration method {d.get('method') if isinstance(d, dict) else d!r}; this embedkit knows 'temperature' and 'none'"
            )
        try:
            t = float(d["temperature"]) if d["method"] == "temperature" else 1.0
            labels = [str(x) for x in d["labels"]]
            rule = DecisionRule.from_dict(d.get("rule"))
            detector = NotMusicDetector.from_dict(d["not_music"]) if d.get("not_music") is not None else None
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"malformed calibration ({first_line(exc, with_type=True)})") from None
        if not (np.isfinite(t) and t > 0):
            raise CalibrationError(f"calibration temperature must be > 0, got {t}")
        if detector is None and rule.not_music is not None:
            raise CalibrationError("malformed calibration (a not-music threshold without its detector)")
        return cls(
            labels=labels,
            temperature=t,
            method=d["method"],
            rule=rule,
            fitted_on=dict(d.get("fitted_on", {})),
            detector=detector,
        )

    def not_music_scores(
        self, features: np.ndarray | None, windows: np.ndarray | None = None, sample_rate: int | None = None
    ) -> np.ndarray | None:
        """Window embeddings [K, D] (and the windows' waveforms [K, L] at ``sample_rate``,
        which a detector with the modulation term reads) -> each window's not-music score [K]
        (None without a detector or features)."""
        if self.detector is None or features is None:
            return None
        return self.detector.score(features, windows, sample_rate)

    def save(self, path: str | os.PathLike) -> Path:
        from .io import atomic_write_text

        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))
        return path


def fit_calibration(p: np.ndarray, y: np.ndarray, labels: Sequence[str]) -> Calibration:
    """Temperature scaling fitted on held-out track probabilities p [N, C], true indices y [N]."""
    return Calibration(labels=list(labels), temperature=fit_temperature(p, y), fitted_on={"n_tracks": int(len(y))})


def load_calibration(run_dir: str | os.PathLike, labels: Sequence[str] | None = None) -> Calibration | None:
    """The run's calibration.json as a Calibration (None when the run has none: runs made
    before calibration existed). Refuses a file whose labels differ from ``labels``."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"{path}: unreadable calibration ({first_line(exc, with_type=True)})") from None
    try:
        cal = Calibration.from_dict(d)
    except CalibrationError as exc:
        raise CalibrationError(f"{path}: {exc}") from None
    if labels is not None and list(labels) != cal.labels:
        raise CalibrationError(f"{path}: calibration labels {cal.labels} differ from the model's {list(labels)}")
    return cal


# ---------------------------------------------------------------------------------------------
# Not music: distance to the training music in the model's embedding space


def _b64(a: np.ndarray, dtype) -> dict[str, Any]:
    import base64

    a = np.ascontiguousarray(a, dtype=dtype)
    return {
        "dtype": np.dtype(dtype).name,
        "shape": list(a.shape),
        "data": base64.b64encode(a.tobytes()).decode("ascii"),
    }


def _unb64(d: dict[str, Any]) -> np.ndarray:
    import base64

    a = np.frombuffer(base64.b64decode(d["data"]), dtype=np.dtype(d["dtype"]))
    return a.reshape([int(x) for x in d["shape"]]).astype(np.float32)


def slog(x: np.ndarray) -> np.ndarray:
    """sign(x) log(1 + |x|): embeddings are mostly post-ReLU and heavy-tailed; on the log scale
    their windows are closer to Gaussian, which the Mahalanobis distance assumes."""
    x = np.asarray(x, dtype=np.float32)
    return np.sign(x) * np.log1p(np.abs(x))


def modulation_depth(windows: np.ndarray, sample_rate: int) -> np.ndarray:
    """How much a window's spectrum moves over time, in dB: windows float [K, L] at
    ``sample_rate`` -> float64 [K] (NaN for a window with fewer than 4 blocks above
    ``NOT_MUSIC_GATE_DB``: silence, zero padding, too short).

    Power spectrogram (Hann frames of ~64 ms, half overlap) -> 16 log-spaced bands (60 Hz to
    7 kHz) -> mean power per 0.25 s block -> per band, the standard deviation over the window's
    blocks of 10 log10(power) -> the median over bands. In units of a level ratio, so the
    loudness of the recording does not matter; what does is whether anything changes: notes,
    beats and words move band levels by several dB, stationary noise only by its estimation
    noise (~0.6 dB here), a tone or hum not at all."""
    import scipy.fft
    from numpy.lib.stride_tricks import sliding_window_view

    x = np.asarray(windows, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected windows [K, L], got shape {x.shape}")
    sr = int(sample_rate)
    n_fft = 1 << int(np.round(np.log2(_DEPTH_FRAME_S * sr)))
    hop = n_fft // 2
    out = np.full(len(x), np.nan)
    n_frames = 1 + (x.shape[1] - n_fft) // hop if x.shape[1] >= n_fft else 0
    per = max(1, int(round(_DEPTH_BLOCK_S * sr / hop)))
    n_blocks = n_frames // per
    if n_blocks < 4:
        return out
    w = np.hanning(n_fft).astype(np.float32)
    f = np.fft.rfftfreq(n_fft, 1 / sr)
    edges = np.geomspace(_DEPTH_FMIN, min(_DEPTH_FMAX, 0.45 * sr), _DEPTH_BANDS + 1)
    lo, hi = np.searchsorted(f, edges[:-1]), np.searchsorted(f, edges[1:])
    starts = lo[hi > lo]  # the bands' first FFT bins (bands without a bin at this resolution left out)
    if len(starts) == 0:  # a sample rate too low for any band
        return out
    w2 = float((w.astype(np.float64) ** 2).mean())
    for k, y in enumerate(x):  # one window at a time: a long stream's windows never all sit in memory
        fr = sliding_window_view(y, n_fft)[::hop][: n_blocks * per] * w  # [T, n_fft]
        spec = scipy.fft.rfft(fr, axis=1, workers=1)
        # contiguous bins summed per band (no BLAS call: its thread team costs more than the sum)
        power = np.add.reduceat(spec.real[:, : hi[-1]] ** 2 + spec.imag[:, : hi[-1]] ** 2, starts, axis=1)  # [T, B]
        level = np.einsum("ij,ij->i", fr, fr, dtype=np.float64) / fr.shape[1] / w2  # mean square, 1.0: full scale
        blocks = power.astype(np.float64).reshape(n_blocks, per, -1).mean(axis=1)
        loud = 10 * np.log10(level.reshape(n_blocks, per).mean(axis=1) + 1e-20) >= NOT_MUSIC_GATE_DB
        if loud.sum() >= 4:
            out[k] = float(np.median((10 * np.log10(blocks[loud] + 1e-12)).std(axis=0)))
    return out


def track_depths(
    paths: dict[str, Any], sample_rate: int, audio, segment, max_tracks: int = NOT_MUSIC_DEPTH_TRACKS, seed: int = 0
) -> dict[str, np.ndarray]:
    """track id -> ``modulation_depth`` of each of its windows [K], decoded as a tagger of the
    run cuts them (clip policy ``audio``, ``sample_rate``, windows and hop ``segment``; the same
    calls as ``Tagger.clip_windows``). At most ``max_tracks`` tracks (a seeded sample); files that
    cannot be decoded are left out."""
    from .audio import decoding
    from .audio.segments import segment as cut

    ids = sorted(paths)
    if len(ids) > max_tracks:
        ids = sorted(np.random.default_rng(seed).choice(ids, max_tracks, replace=False).tolist())
    out: dict[str, np.ndarray] = {}
    for t in ids:
        try:
            y = decoding.load(paths[t], sample_rate, audio, min_duration_s=segment.segment_s, notes=[])
            frames = cut(y, sample_rate, segment)[0]
        except (EmbedkitError, OSError, ValueError):
            continue
        if len(frames):
            out[t] = modulation_depth(frames, sample_rate)
    return out


def training_depths(
    paths: dict[str, Any], sample_rate: int | None, preprocess: dict[str, Any] | None
) -> tuple[dict[str, np.ndarray] | None, str]:
    """(``track_depths`` of a head run's training tracks, cut with the run's preprocessing
    {"audio", "segments"} at the backbone's ``sample_rate``, or None; why there are none).
    Kept for the next call on the same files (a pipeline fits several heads on one dataset)."""
    from .config import PreprocessConfig

    if not sample_rate:
        return None, "the backbone spec records no sample rate"
    prep = PreprocessConfig.from_dict(preprocess or {})

    def stamp(path) -> tuple:
        try:
            st = os.stat(path)
            return (str(path), st.st_mtime_ns, st.st_size)
        except OSError:
            return (str(path), None, None)

    key = (
        int(sample_rate),
        json.dumps(prep.to_dict(), sort_keys=True),
        tuple(sorted((t, *stamp(p)) for t, p in paths.items())),
    )
    if key not in _DEPTHS_SEEN:
        _DEPTHS_SEEN.clear()  # one dataset at a time: a long-lived process does not accumulate them
        _DEPTHS_SEEN[key] = track_depths(paths, int(sample_rate), prep.audio, prep.segments)
    d = _DEPTHS_SEEN[key]
    return (d, "") if d else (None, "none of the training tracks' audio could be decoded at fit time")


_DEPTHS_SEEN: dict[tuple, dict[str, np.ndarray]] = {}


@dataclass(eq=False)
class NotMusicDetector:
    """How unlike the training music a window is: the squared Mahalanobis distance of its
    embedding (``slog``-transformed, centred on ``center`` [D], projected on ``proj`` [D, d] when
    the embedding has more than ``NOT_MUSIC_MAX_DIM`` dimensions) under the training windows'
    covariance shrunk towards its mean variance by ``shrinkage`` (``precision`` [d, d] is its
    inverse), divided by the dimension d: about 1 for a typical training window. ``score``
    (features [K, D], and for a detector with the modulation term the windows [K, L] and their
    sample rate) -> [K]; a track's score is the mean of its windows'. ``fitted_on``: windows,
    tracks, the embedding it reads.

    modulation: None (the embedding score alone: method "mahalanobis-slog"), or the modulation
    term's references {"depth_ref": dB, "embedding_ref": score, "cap": ratio} (method
    "mahalanobis-slog+modulation", see the module docstring)."""

    center: np.ndarray
    precision: np.ndarray
    proj: np.ndarray | None = None
    shrinkage: float = NOT_MUSIC_SHRINKAGE
    method: str = "mahalanobis-slog"
    fitted_on: dict[str, Any] = field(default_factory=dict)
    modulation: dict[str, float] | None = None

    def __post_init__(self) -> None:
        self.method = "mahalanobis-slog" if self.modulation is None else "mahalanobis-slog+modulation"

    def __eq__(self, other) -> bool:  # arrays compare by value (Calibrations compare equal after a reload)
        if not isinstance(other, NotMusicDetector):
            return NotImplemented
        same = lambda a, b: (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))  # noqa: E731
        return (self.shrinkage, self.method, self.fitted_on, self.modulation) == (
            other.shrinkage,
            other.method,
            other.fitted_on,
            other.modulation,
        ) and all(same(getattr(self, n), getattr(other, n)) for n in ("center", "precision", "proj"))

    @property
    def dim(self) -> int:
        return int(self.center.shape[0])

    @property
    def modulation_note(self) -> str | None:
        """Why this detector reads the embedding alone (None when it has the modulation term)."""
        if self.modulation is not None:
            return None
        why = self.fitted_on.get("modulation")  # the reason, when fitted without training audio
        return why if isinstance(why, str) else "made before the modulation term: the embedding score alone"

    def _reduced(self, features: np.ndarray) -> np.ndarray:
        y = slog(features) - self.center
        return y if self.proj is None else y @ self.proj

    def embedding_score(self, features: np.ndarray) -> np.ndarray:
        """Window embeddings [K, D] -> the Mahalanobis part of the score per window float64 [K]."""
        x = np.asarray(features, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise CalibrationError(f"the not-music detector takes embeddings [K, {self.dim}], got shape {x.shape}")
        y = self._reduced(x).astype(np.float64)
        return ((y @ self.precision) * y).sum(axis=1) / self.precision.shape[0]

    def combine(self, m: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Embedding scores [K] and modulation depths [K] (NaN: not measured) -> window scores
        [K]: ``max(m, embedding_ref * min(depth_ref / depth, cap))``; m alone where depth is NaN."""
        mod = self.modulation
        m = np.asarray(m, dtype=np.float64)
        if mod is None:
            return m
        d = np.asarray(depth, dtype=np.float64)
        ratio = mod["depth_ref"] / np.maximum(np.where(np.isnan(d), np.inf, d), mod["depth_ref"] / mod["cap"])
        return np.maximum(m, mod["embedding_ref"] * ratio)

    def score(
        self, features: np.ndarray, windows: np.ndarray | None = None, sample_rate: int | None = None
    ) -> np.ndarray:
        """Window embeddings [K, D] (and, for a detector with the modulation term, the same
        windows' waveforms [K, L] at ``sample_rate``) -> not-music score per window float64 [K]."""
        m = self.embedding_score(features)
        if self.modulation is None:
            return m
        if windows is None or sample_rate is None:
            raise CalibrationError("this not-music detector also reads the windows' waveforms (and their sample rate)")
        w = np.asarray(windows)
        if w.ndim != 2 or len(w) != len(m):
            raise CalibrationError(
                f"expected the {len(m)} windows [K, L] the embeddings came from, got shape {w.shape}"
            )
        return self.combine(m, modulation_depth(w, sample_rate))

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "shrinkage": self.shrinkage,
            "center": _b64(self.center, np.float32),
            "precision": _b64(self.precision, np.float32),
            "proj": None if self.proj is None else _b64(self.proj, np.float32),
            "fitted_on": self.fitted_on,
            **({} if self.modulation is None else {"modulation": dict(self.modulation)}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NotMusicDetector":
        methods = ("mahalanobis-slog", "mahalanobis-slog+modulation")
        if not isinstance(d, dict) or d.get("method") not in methods:
            raise CalibrationError(
                f"unknown not-music method {d.get('method') if isinstance(d, dict) else d!r}; this embedkit knows {', '.join(repr(m) for m in methods)}"
            )
        center, prec = _unb64(d["center"]), _unb64(d["precision"])
        proj = None if d.get("proj") is None else _unb64(d["proj"])
        k = prec.shape[0] if prec.ndim == 2 else -1
        if (
            center.ndim != 1
            or prec.shape != (k, k)
            or (proj is not None and proj.shape != (len(center), k))
            or (proj is None and k != len(center))
        ):
            raise CalibrationError("malformed not-music detector (shapes of center, precision and proj disagree)")
        mod = None
        if d["method"] == "mahalanobis-slog+modulation":
            mod = {k: float(d["modulation"][k]) for k in ("depth_ref", "embedding_ref", "cap")}
            if not all(np.isfinite(v) and v > 0 for v in mod.values()):
                raise CalibrationError(f"malformed not-music detector (modulation references must be > 0, got {mod})")
        return cls(center, prec, proj, float(d["shrinkage"]), d["method"], dict(d.get("fitted_on") or {}), mod)

    @classmethod
    def fit(cls, windows: np.ndarray, shrinkage: float = NOT_MUSIC_SHRINKAGE, max_dim: int = NOT_MUSIC_MAX_DIM):
        """Training window embeddings [N, D] -> a detector (the embedding score alone; the
        modulation term is added by ``fit_not_music``)."""
        x = np.asarray(windows, dtype=np.float32)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"expected training embeddings [N >= 2, D], got shape {x.shape}")
        return cls.from_moments(_Moments.of(x), shrinkage, max_dim)

    @classmethod
    def from_moments(cls, mom: "_Moments", shrinkage: float = NOT_MUSIC_SHRINKAGE, max_dim: int = NOT_MUSIC_MAX_DIM):
        """The detector of the windows whose ``_Moments`` (of their slog embeddings) are given:
        the same as ``fit`` on them, without the windows (cross-fitting subtracts one part's
        moments from the whole's instead of going over the other parts' windows again).
        Large embeddings keep their top principal directions: the covariance's leading
        eigenvectors (those of the centred windows' SVD)."""
        if mom.n < 2:
            raise ValueError(f"expected at least 2 training windows, got {mom.n}")
        center = mom.s / mom.n
        cov = mom.q / mom.n - np.outer(center, center)
        proj = None
        if cov.shape[0] > max_dim:  # large embeddings (PANNs: 2048): their top principal directions
            w, v = np.linalg.eigh(cov)
            proj = v[:, np.argsort(w)[::-1][:max_dim]]
            cov = proj.T @ cov @ proj
            proj = proj.astype(np.float32)
        d = cov.shape[0]
        mu = float(np.trace(cov)) / d
        shrunk = (1 - shrinkage) * cov + shrinkage * max(mu, 1e-12) * np.eye(d)
        prec = np.linalg.inv(shrunk).astype(np.float32)
        return cls(center.astype(np.float32), prec, proj, float(shrinkage))


@dataclass
class _Moments:
    """Count, sum [D] and sum of outer products [D, D] (float64) of slog window embeddings."""

    n: int
    s: np.ndarray
    q: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> "_Moments":
        z = slog(np.asarray(x, dtype=np.float32)).astype(np.float64)
        return cls(len(z), z.sum(axis=0), z.T @ z)

    def __add__(self, other: "_Moments") -> "_Moments":
        return _Moments(self.n + other.n, self.s + other.s, self.q + other.q)

    def __sub__(self, other: "_Moments") -> "_Moments":
        return _Moments(self.n - other.n, self.s - other.s, self.q - other.q)


#: the part of tracks that are only references (held out in no part)
_REFERENCE_ONLY = object()


def select_not_music_threshold(
    scores_held_out: np.ndarray, quantile: float = NOT_MUSIC_QUANTILE, margin: float = NOT_MUSIC_MARGIN
) -> float:
    """The not-music threshold from held-out music tracks' scores: their ``quantile`` times
    ``margin`` (rounded to 4 decimals)."""
    s = np.asarray(scores_held_out, dtype=np.float64)
    if len(s) == 0:
        raise ValueError("no held-out tracks to choose a not-music threshold on")
    return round(float(np.quantile(s, quantile)) * margin, 4)


def held_out_window_scores(features: dict[str, np.ndarray], parts: dict[str, str]) -> dict[str, np.ndarray]:
    """Each held-out track's embedding score per window [K] from a detector fitted on the
    windows of every track outside its part. features: track id -> window embeddings [K, D]
    (every track the run has, training tracks included); parts: held-out track id -> its part
    (fold). Tracks of no part are only references."""
    out: dict[str, np.ndarray] = {}
    ids = [t for t in features if len(features[t])]
    if not ids:
        return out
    # one pass over the windows: each part's moments, and the whole's; a part's detector is
    # fitted on the whole's moments minus the part's (the same sums, not a second pass)
    members: dict[Any, list[str]] = {}
    for t in ids:
        members.setdefault(parts.get(t, _REFERENCE_ONLY), []).append(t)
    mom = {g: _Moments.of(np.concatenate([features[t] for t in ts])) for g, ts in members.items()}
    total = functools.reduce(lambda a, b: a + b, mom.values())
    for g in (g for g in members if g is not _REFERENCE_ONLY):
        ref = total - mom[g]
        if ref.n < 2:
            continue
        det = NotMusicDetector.from_moments(ref)
        for t in (t for t in ids if parts.get(t) == g):
            out[t] = det.embedding_score(features[t])
    return out


def held_out_not_music_scores(features: dict[str, np.ndarray], parts: dict[str, str]) -> dict[str, float]:
    """Each held-out track's embedding score (the mean of ``held_out_window_scores``)."""
    return {t: float(s.mean()) for t, s in held_out_window_scores(features, parts).items()}


def fit_not_music(
    features: dict[str, np.ndarray],
    parts: dict[str, str],
    what: str = "embedding",
    depths: dict[str, np.ndarray] | None = None,
    why_no_depths: str = "no training audio given",
) -> tuple[NotMusicDetector | None, float | None, dict[str, Any]]:
    """The run's not-music detector (every track's windows as references) and its threshold,
    chosen on held-out scores (``held_out_window_scores``, ``select_not_music_threshold``).

    depths: track id -> ``modulation_depth`` of the same windows as ``features`` (``track_depths``);
    with them the detector gets the modulation term, its references chosen on the training
    tracks (``embedding_ref``: the 99 % quantile of the held-out embedding scores; ``depth_ref``:
    the 1 % quantile of the training windows' depth), and the threshold is chosen on the
    held-out tracks' combined scores (those with depths). None or empty: the embedding score
    alone, ``why_no_depths`` recorded. Returns (detector, threshold, the metrics.json "not_music"
    block); (None, None, block with the reason) when there is nothing held out to choose on."""
    feats = {t: np.asarray(f, dtype=np.float32) for t, f in features.items() if len(f)}
    held_w = held_out_window_scores(feats, {t: g for t, g in parts.items() if t in feats})
    if not held_w or not feats:
        return None, None, {"why_none": "no held-out tracks with embeddings"}
    det = NotMusicDetector.fit(np.concatenate(list(feats.values())))
    det.fitted_on = {"n_tracks": len(feats), "n_windows": int(sum(len(f) for f in feats.values())), "embedding": what}
    m = np.array([s.mean() for s in held_w.values()])
    # a track's depths pair with its windows only when both came from the same cut
    dep = {
        t: np.asarray(d, dtype=np.float64) for t, d in (depths or {}).items() if t in feats and len(d) == len(feats[t])
    }
    measured = np.concatenate(list(dep.values())) if dep else np.zeros(0)
    measured = measured[~np.isnan(measured)]
    mod_block: dict[str, Any]
    if len(measured) and any(t in dep for t in held_w):
        det.modulation = {
            "depth_ref": max(float(np.quantile(measured, NOT_MUSIC_DEPTH_QUANTILE)), 1e-3),
            "embedding_ref": float(np.quantile(m, NOT_MUSIC_QUANTILE)),
            "cap": NOT_MUSIC_DEPTH_CAP,
        }
        det.method = "mahalanobis-slog+modulation"
        held = {t: float(det.combine(s, dep[t]).mean()) for t, s in held_w.items() if t in dep}
        det.fitted_on["modulation"] = {"n_tracks": len(dep), "n_windows": int(len(measured))}
        mod_block = {
            **det.modulation,
            "rule": f"window score max(m, embedding_ref x min(depth_ref / depth, cap)); depth_ref: the {NOT_MUSIC_DEPTH_QUANTILE:.0%} quantile of {len(measured)} training windows' modulation depth (dB)",
            "n_tracks": len(dep),
        }
    else:
        why = why_no_depths if not depths else "the training audio's windows did not match the embeddings' windows"
        det.fitted_on["modulation"] = f"no modulation term: {why}; the embedding score alone"
        held = {t: float(s.mean()) for t, s in held_w.items()}
        mod_block = {"why_none": why}
    s = np.array(list(held.values()))
    t = select_not_music_threshold(s)
    block = {
        "method": det.method,
        "shrinkage": det.shrinkage,
        "embedding": what,
        "threshold": t,
        "rule": f"{NOT_MUSIC_QUANTILE:.0%} quantile of the held-out music tracks' scores x {NOT_MUSIC_MARGIN}",
        "held_out": {
            "n_tracks": len(s),
            "flagged": float((s >= t).mean()),
            "quantiles": {q: float(np.quantile(s, float(q))) for q in ("0.5", "0.9", "0.99")},
            "max": float(s.max()),
        },
        "modulation": mod_block,
        "dimensions": int(det.precision.shape[0]),
    }
    return det, t, block


# ---------------------------------------------------------------------------------------------
# Thresholds


def coverage_curve(p: np.ndarray, y: np.ndarray, thresholds: Sequence[float] | None = None) -> list[dict[str, float]]:
    """For each threshold t: coverage (share of tracks whose top probability >= t) and the
    accuracy of those tracks (None when none is covered). Default thresholds 0, 0.02, ..., 1."""
    p, y = _check(p, y)
    conf = p.max(axis=1)
    right = p.argmax(axis=1) == y
    ts = np.round(np.linspace(0, 1, 51), 4) if thresholds is None else np.asarray(thresholds, dtype=float)
    out = []
    for t in ts:
        m = conf >= t
        n = int(m.sum())
        out.append(
            {
                "threshold": float(t),
                "coverage": n / len(conf) if len(conf) else 0.0,
                "accuracy": float(right[m].mean()) if n else None,
                "n": n,
            }
        )
    return out


def select_threshold(
    p: np.ndarray,
    y: np.ndarray,
    target: float = TARGET_PRECISION,
    min_tagged: int = MIN_TAGGED,
    min_tracks: int = MIN_THRESHOLD_TRACKS,
) -> dict[str, Any]:
    """The default threshold, chosen on held-out tracks by a documented rule.

    Candidates are the tracks' top probabilities. Rule: the smallest candidate t such that the
    tracks with top probability >= t are right at least ``target`` of the time and number at
    least ``min(min_tagged, N)``; the threshold returned is the midpoint between t and the next
    lower top probability (it tags the same held-out tracks, with a margin on either side).
    When no candidate reaches the target, the one with the highest precision among those
    leaving ``min_tagged`` tracks tagged is used and ``target_reached`` is False. With fewer
    than ``min_tracks`` tracks no threshold is chosen (0: nothing is "uncertain").

    Returns {threshold, target, target_reached, coverage, accuracy, n_tagged, n_tracks}.
    """
    p, y = _check(p, y)
    n = len(p)
    if n == 0:
        raise ValueError("no tracks to choose a threshold on")
    conf = p.max(axis=1)
    right = (p.argmax(axis=1) == y).astype(float)
    if n < min_tracks:
        return {
            "threshold": 0.0,
            "target": target,
            "target_reached": False,
            "coverage": 1.0,
            "accuracy": float(right.mean()),
            "n_tagged": n,
            "n_tracks": n,
            "note": f"only {n} held-out tracks (a threshold needs {min_tracks}): none chosen",
        }
    order = np.argsort(-conf, kind="stable")
    c_sorted, r_sorted = conf[order], right[order]
    # Tracks tagged at threshold c_sorted[i]: every track with conf >= c_sorted[i] (ties included).
    last = np.searchsorted(-c_sorted, -c_sorted, side="right")  # count with conf >= c_sorted[i]
    cum = np.cumsum(r_sorted)
    prec = cum[last - 1] / last
    need = min(min_tagged, n)
    ok = (last >= need) & (prec >= target - 1e-12)
    reached = bool(ok.any())
    if reached:
        i = int(np.flatnonzero(ok)[-1])  # the lowest confidence (sorted descending) that qualifies
    else:
        cand = np.flatnonzero(last >= need)
        i = int(cand[np.argmax(prec[cand] + 1e-9 * np.arange(len(cand)))])  # ties: lower threshold
    t_hi = float(c_sorted[i])
    lower = conf[conf < t_hi]
    t = (t_hi + float(lower.max())) / 2 if len(lower) else t_hi
    m = conf >= t
    return {
        "threshold": t,
        "target": target,
        "target_reached": reached,
        "coverage": float(m.mean()),
        "accuracy": float(right[m].mean()) if m.any() else None,
        "n_tagged": int(m.sum()),
        "n_tracks": n,
    }


# ---------------------------------------------------------------------------------------------
# A finished run: fit, cross-fit, choose the threshold, write calibration.json


def _cross_groups(groups: np.ndarray, y: np.ndarray, seed: int = 0, k: int = 5) -> np.ndarray:
    """Cross-fitting groups: the CV folds when there are several, else k stratified chunks."""
    if len(np.unique(groups)) >= 2:
        return groups
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y)
    k = int(min(k, counts[counts > 0].min())) if len(counts) else 0
    out = np.zeros(len(y), dtype=object)
    if k < 2:  # too few tracks per class to stratify: interleaved chunks
        k = min(5, len(y))
        for i in range(len(y)):
            out[i] = f"chunk{i % max(k, 1)}"
        return out
    for j, (_, te) in enumerate(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)):
        out[te] = f"chunk{j}"
    return out


def cross_fit(p: np.ndarray, y: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Each group's tracks calibrated by a temperature fitted on the other groups only (1 where
    those cannot support a fit, see ``can_fit_temperature``). Returns (calibrated probabilities [N, C], the temperature used for each group)."""
    p, y = _check(p, y)
    out = np.empty_like(p)
    temps = []
    for g in dict.fromkeys(groups.tolist()):
        te = groups == g
        t = 1.0 if can_fit_temperature(p[~te], y[~te]) else fit_temperature(p[~te], y[~te])
        temps.append(t)
        out[te] = _softmax_t(p[te], t)
    return out, temps


def cross_fit_threshold(q: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Tagged mask [N]: each group's tracks thresholded by ``select_threshold`` applied to the
    other groups' tracks (the choice of the threshold never sees the tracks it is scored on)."""
    tagged = np.zeros(len(q), dtype=bool)
    for g in dict.fromkeys(groups.tolist()):
        te = groups == g
        if (~te).any():
            tagged[te] = q[te].max(axis=1) >= select_threshold(q[~te], y[~te])["threshold"]
    return tagged


def evaluate_calibration(
    p: np.ndarray, y: np.ndarray, groups: np.ndarray, labels: Sequence[str]
) -> tuple[Calibration, dict[str, Any]]:
    """Fit the deployable calibration on every held-out track and measure it honestly.

    p: out-of-fold track probabilities [N, C]; y: true indices [N]; groups: the fold of each
    track (one value for a single test part). Temperature scaling is kept only when it can be
    fitted (``can_fit_temperature``) and lowers the cross-fitted NLL (a proper scoring rule; ECE on ~100 tracks is too noisy to decide
    on); otherwise the calibration is the identity (method "none", T = 1). Returns
    (Calibration with the default threshold in its rule, the metrics.json "calibration" block)."""
    p, y = _check(p, y)
    groups = _cross_groups(np.asarray(groups, dtype=object), y)
    before = scores(p, y)
    p_t, temps = cross_fit(p, y, groups)
    candidates = {"none": before, "temperature": scores(p_t, y)}
    why_not = can_fit_temperature(p, y)
    if not why_not and candidates["temperature"]["nll"] >= before["nll"]:
        why_not = f"temperature scaling did not lower the held-out NLL ({candidates['temperature']['nll']:.4f} vs {before['nll']:.4f})"
    method = "none" if why_not else "temperature"
    q = p_t if method == "temperature" else p
    cal = fit_calibration(p, y, labels) if method == "temperature" else Calibration(labels=list(labels), method="none")
    sel = select_threshold(q, y)
    tagged = cross_fit_threshold(q, y, groups)
    cal.rule = DecisionRule(threshold=round(sel["threshold"], 4))
    right = q.argmax(axis=1) == y
    n_parts = len(set(groups.tolist()))
    fitted = (
        cal.temperature if method == "temperature" else (None if can_fit_temperature(p, y) else fit_temperature(p, y))
    )
    cal.fitted_on = {
        "n_tracks": int(len(y)),
        "what": "out-of-fold track probabilities (mean over segments)",
        "temperature_fitted": fitted,
        "why_not_temperature": why_not,
    }
    block = {
        "method": method,
        "temperature": cal.temperature,
        "ece_bins": ECE_BINS,
        "measured_on": f"{len(y)} held-out tracks, cross-fitted over {n_parts} parts: each part calibrated by a temperature fitted on the others",
        "choice": "temperature scaling kept only when it lowers the cross-fitted NLL; else none (identity)",
        "why_not_temperature": why_not,
        "candidates": candidates,
        "before": before,
        "after": scores(q, y),
        "ece_if_calibrated": ece_if_calibrated(q),
        "cross_fit_temperatures": temps,
        "reliability_before": reliability(p, y),
        "reliability_after": reliability(q, y),
        "coverage_curve": coverage_curve(q, y),
        "threshold": {
            **sel,
            "rule": f"smallest threshold on the calibrated top probability whose tagged held-out tracks are >= {TARGET_PRECISION:.0%} right (at least {MIN_TAGGED} tagged)",
            # the threshold chosen without each part's tracks: an unbiased estimate of the rule
            "cross_fitted": {
                "coverage": float(tagged.mean()),
                "accuracy": float(right[tagged].mean()) if tagged.any() else None,
                "n_tagged": int(tagged.sum()),
            },
        },
        "file": CALIBRATION_FILE,
    }
    return cal, block


def calibrate_run(
    ev,
    run_dir: str | os.PathLike,
    features: dict[str, np.ndarray] | None = None,
    what: str = "embedding",
    depths: dict[str, np.ndarray] | None = None,
    why_no_depths: str = "no training audio given",
) -> dict[str, Any]:
    """The one call a trainer makes when its run is finished: fit the calibration on the
    Evaluation's out-of-fold tracks, write ``run_dir/calibration.json``, and return the
    metrics.json "calibration" block (scores before / after on tracks the calibration never saw,
    the default threshold with its coverage and accuracy, the charts' data).

    features: track id -> the model's window embeddings [K, D] of every track of the run (the
    training ones too): the not-music detector and its threshold (``fit_not_music``, the block's
    "not_music"); None: no detector. depths: track id -> ``modulation_depth`` of the same windows
    (``track_depths``): the detector's modulation term; None: the embedding score alone, for
    the reason ``why_no_depths``."""
    df, p = ev.track_probabilities()
    cal, block = evaluate_calibration(p, df["true"].to_numpy(), df["fold"].to_numpy(), ev.labels)
    # the genre mix the model was trained on: `embedkit monitor` measures drift against it
    counts = np.bincount(df["true"].to_numpy(), minlength=len(ev.labels))
    cal.fitted_on["prior"] = {l: float(c / max(counts.sum(), 1)) for l, c in zip(ev.labels, counts)}
    if features is not None:
        feats = {str(k): v for k, v in features.items()}
        parts = dict(zip(df["track_id"].astype(str), df["fold"].astype(str)))
        if len(set(parts.values())) < 2 or set(feats) - set(parts):
            # a holdout or split run: its test part alone is a small sample of held-out music;
            # the detector never sees labels, so every track is held out once, over
            # NOT_MUSIC_PARTS interleaved parts (a head's backbone saw none of them; a CNN's
            # deployed network saw them all either way)
            ids = sorted(feats)
            parts = {t: f"part{i % NOT_MUSIC_PARTS}" for i, t in enumerate(ids)}
        det, t, block["not_music"] = fit_not_music(
            feats, parts, what, None if depths is None else {str(k): v for k, v in depths.items()}, why_no_depths
        )
        if det is not None:
            cal.detector = det
            cal.rule = replace(cal.rule, not_music=t)
    cal.save(Path(run_dir) / CALIBRATION_FILE)
    return block
