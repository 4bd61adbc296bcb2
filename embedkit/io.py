"""File-system and provenance utilities shared by every stage: atomic writes, library versions,
JSON normalising.

Every artefact embedkit writes (store shards, metrics.json, head bundles, model files, caches,
reports) goes through ``atomic_write``, so a reader sees the old file or the new one, never a part.
"""

from __future__ import annotations

import json
import os
import platform
import threading
from pathlib import Path
from typing import Any, BinaryIO, Callable

from . import __version__


def versions() -> dict[str, str]:
    """Installed versions of the libraries that shape an embedding. Read from package metadata
    rather than by importing (importing scikit-learn and LightGBM cost ~1 s per extract call)."""
    from importlib import metadata

    out = {"embedkit": __version__, "python": platform.python_version()}
    for dist in ("numpy", "torch", "librosa", "soundfile", "av", "soxr", "pyarrow", "scikit-learn", "lightgbm"):
        try:
            out["sklearn" if dist == "scikit-learn" else dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def tmp_name(path: Path) -> Path:
    # pid + thread id: two writers of one file (processes or threads) never share a temporary.
    return path.with_name(f"{path.name}.tmp{os.getpid()}-{threading.get_ident()}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` through ``write(fh)`` so readers see the old file or the new one, never a
    part: a private temporary in the same folder, fsynced, then renamed over ``path``; the
    temporary is removed if anything fails (a full disk, an interrupt)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """``atomic_write`` of a bytes object."""
    atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """UTF-8 text version of atomic_write_bytes."""
    atomic_write_bytes(path, text.encode("utf-8"))


def jsonable(o: Any) -> Any:
    """``json.dumps(default=...)`` hook: numpy scalars -> Python numbers, arrays -> lists, tuples
    and sets -> lists, anything else -> its ``str``."""
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    return str(o)


def plain(obj: Any) -> Any:
    """JSON-plain copy of ``obj`` (tuples -> lists, numpy -> Python, other objects -> str):
    what run.json, metrics.json and bundles store, so a value read back compares equal to the
    value that was written."""
    return json.loads(json.dumps(obj, default=jsonable))
