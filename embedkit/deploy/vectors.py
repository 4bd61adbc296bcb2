"""Track vectors kept by ``embedkit tag --db``: one per (audio content, model), for similarity.

Every window ``embedkit tag`` listens to is embedded on the way to its genre probabilities; the
mean of the excerpt's window embeddings is the track's vector (``Tagger.predict_and_embed``):

- head runs: the backbone's embedding (musicnn: the 200-d penultimate layer; PANNs Cnn14: 2048-d),
  the very numbers the head was fitted on (whatever output the head uses);
- scratch CNN and fine-tuned runs: the input of the network's classifier layer (the CNN's global
  average of its last convolution block; the fine-tuned backbone's embedding). Not measured for
  similarity here (gtzan_mini's figures are for musicnn-msd + lr);
- ONNX exports: none (the exported graph gives probabilities only).

Table ``tag_vectors`` of the results database, primary key (fingerprint, model_id) like
``tags``: space (what the vector is, e.g. ``backbone:musicnn-msd:embedding``), dim, dtype
(``f4``), vector (little-endian float32 bytes), sketch (the excerpt's loudness in 7 bands every
0.1 s, int8: ~2 KB for 30 s; how near-duplicates are told apart from merely similar tracks,
``sketch_similarity``), n_windows, excerpt, artist / album / title
(read from the file's own tags when it was tagged, for the playlist rules), timestamps.

Plain bytes rather than a vector extension (pgvector): the same column on SQLite and
PostgreSQL, no server extension to install, and search runs in-process on an index built from
the table (``embedkit.deploy.similar``); pgvector's HNSW also stops at 2000 dimensions, below
PANNs' 2048. A vector is 4 x dim bytes (800 B for musicnn), next to a ``tags`` row of ~1 KB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

#: the vectors table's name in the results database
TABLE = "tag_vectors"


def vector_table(meta):
    """The ``tag_vectors`` table on SQLAlchemy ``meta`` (``ResultsDB`` creates it)."""
    import sqlalchemy as sa

    return sa.Table(
        TABLE,
        meta,
        sa.Column("fingerprint", sa.String(64), primary_key=True),
        sa.Column("model_id", sa.String(64), primary_key=True),
        sa.Column("space", sa.Text),
        sa.Column("dim", sa.Integer),
        sa.Column("dtype", sa.String(8)),
        sa.Column("vector", sa.LargeBinary),
        sa.Column("sketch", sa.LargeBinary),  # int8 [T, len(SKETCH_EDGES) - 1]: near-duplicates
        sa.Column("n_windows", sa.Integer),
        sa.Column("excerpt", sa.String(32)),
        sa.Column("artist", sa.Text),
        sa.Column("album", sa.Text),
        sa.Column("title", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True)),
        sa.Column("updated_at", sa.DateTime(timezone=True)),
    )


def track_vector(window_embeddings: np.ndarray) -> np.ndarray:
    """Window embeddings [K, D] -> the track vector float32 [D] (their mean)."""
    e = np.asarray(window_embeddings, dtype=np.float64)
    return e.mean(axis=0).astype(np.float32)


#: the loudness sketch: frames per second and band edges (Hz): what near-duplicates are told by
SKETCH_RATE = 10
SKETCH_EDGES = (60, 150, 300, 600, 1200, 2400, 4800, 8000)


def sketch(windows: np.ndarray, sample_rate: int) -> np.ndarray:
    """The excerpt's loudness sketch int8 [T, B]: level (dB below the excerpt's loudest frame,
    clipped at -127) in B bands of 1 / SKETCH_RATE s frames of the windows laid end to end. A
    re-encode keeps it (to a dB or so), a trim shifts it; two recordings of the same style do not
    share it. Cheap: one FFT per 100 ms of audio already decoded."""
    y = np.asarray(windows, dtype=np.float32).reshape(-1)
    hop = int(sample_rate // SKETCH_RATE)
    n = len(y) // hop
    if n == 0:
        return np.zeros((0, len(SKETCH_EDGES) - 1), np.int8)
    frames = y[: n * hop].reshape(n, hop) * np.hanning(hop).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(hop, 1.0 / sample_rate)
    bands = [power[:, (freqs >= lo) & (freqs < hi)].sum(axis=1) for lo, hi in zip(SKETCH_EDGES, SKETCH_EDGES[1:])]
    db = 10 * np.log10(np.stack(bands, axis=1) + 1e-12)
    db -= db.max()
    return np.clip(np.round(db), -127, 0).astype(np.int8)


def sketch_similarity(a: np.ndarray, b: np.ndarray, max_lag_s: float = 5.0, min_overlap_s: float = 5.0) -> float:
    """The best correlation of two sketches over time shifts up to ``max_lag_s`` (a trimmed or
    padded copy), each band's mean removed over the overlap: ~1 for the same recording, low for
    different ones. -1 when they do not overlap by ``min_overlap_s``."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    best = -1.0
    lag_max, need = int(max_lag_s * SKETCH_RATE), int(min_overlap_s * SKETCH_RATE)
    for lag in range(-lag_max, lag_max + 1):
        x, y = (a[lag:], b) if lag >= 0 else (a, b[-lag:])
        n = min(len(x), len(y))
        if n < need:
            continue
        x = x[:n] - x[:n].mean(axis=0)
        y = y[:n] - y[:n].mean(axis=0)
        den = float(np.sqrt((x * x).sum() * (y * y).sum()))
        if den > 0:
            best = max(best, float((x * y).sum()) / den)
    return best


def to_bytes(v: np.ndarray) -> bytes:
    return np.ascontiguousarray(v, dtype="<f4").tobytes()


def sketch_from_bytes(b: bytes | None) -> np.ndarray | None:
    if b is None:
        return None
    return np.frombuffer(b, dtype=np.int8).reshape(-1, len(SKETCH_EDGES) - 1)


def from_bytes(b: bytes, dim: int | None = None) -> np.ndarray:
    v = np.frombuffer(b, dtype="<f4")
    if dim is not None and len(v) != dim:
        raise ValueError(f"stored vector has {len(v)} values, expected {dim}")
    return v.astype(np.float32)


def library_tags(path: str) -> dict[str, str | None]:
    """{artist, album, title} from the file's own tags (``embedkit.tags.read_library_tags``, the
    one tag reader); None where absent, or for a file without readable tags (never raises)."""
    from ..tags import read_library_tags

    try:
        t = read_library_tags(path)
    except Exception:  # not taggable, damaged tags (any parser error): the track has no such tags
        return {"artist": None, "album": None, "title": None}
    return {"artist": t.artist, "album": t.album, "title": t.title}


@dataclass
class TrackVector:
    """What ``TrackResult.vector`` holds: the track vector float32 [D], what it is (``space``),
    and the file's artist / album / title (``library_tags``)."""

    values: np.ndarray
    space: str
    tags: dict[str, Any] = field(default_factory=dict)
    sketch: np.ndarray | None = None  # int8 [T, B] (``sketch``)


def vector_row(result, tv: TrackVector) -> dict[str, Any]:
    """The ``tag_vectors`` row of a ``TrackResult`` and its track vector."""
    vector, tags = tv.values, tv.tags or {}
    return {
        "fingerprint": result.fingerprint,
        "model_id": result.model_id,
        "space": tv.space,
        "dim": int(len(vector)),
        "dtype": "f4",
        "vector": to_bytes(vector),
        "sketch": None if tv.sketch is None else np.ascontiguousarray(tv.sketch, dtype=np.int8).tobytes(),
        "n_windows": int(result.n_windows),
        "excerpt": result.excerpt,
        "artist": tags.get("artist"),
        "album": tags.get("album"),
        "title": tags.get("title"),
    }


def vector_rows(results: Iterable) -> list[dict[str, Any]]:
    """``tag_vectors`` rows of the results that carry a vector (``TrackResult.vector``)."""
    return [vector_row(r, r.vector) for r in results if r.vector is not None and r.fingerprint is not None]
