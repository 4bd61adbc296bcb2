"""Finding and verifying weights that are not packaged with embedkit (PANNs files, AST dirs).

Resolution order for a weights file: explicit path (``--checkpoint``) -> environment variable ->
conventional location (e.g. ``~/panns_data/Cnn14_mAP=0.431.pth``). Nothing is ever downloaded
here: when the file is absent the error says where to put it and where it is published.

Verification: a file that claims to be the published one (same file name, or same byte size)
must have the published size and checksum, so a truncated or corrupted download fails with one
clear line instead of a confusing unpickling error. Any other file (a fine-tuned or test
checkpoint) is accepted on structure alone, checked by the family loader. Either way the file's
SHA-256 identifies the exact weights in store keys.

Checkpoints are read with ``torch.load(weights_only=True)``; the official PANNs files also hold
NumPy arrays/scalars (training-sampler state), so only the NumPy types needed to rebuild plain
arrays are allow-listed, for the duration of the call (never a blanket ``weights_only=False``).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadingError


@dataclass(frozen=True)
class PublishedFile:
    """A weights file published somewhere we cannot fetch from (documented, verified locally).

    filename: the published file name (also the name at the conventional location).
    env_var: environment variable that may hold the file's path.
    default_dir: conventional folder ("~" is expanded when resolving, so tests can move HOME).
    url: where the file is published (shown in error messages; never fetched).
    size, md5, sha256: published byte size and checksums when known (None: not checked).
    """

    name: str
    filename: str
    env_var: str
    default_dir: str
    url: str
    size: int | None = None
    md5: str | None = None
    sha256: str | None = None

    def default_path(self) -> Path:
        return Path(os.path.expanduser(self.default_dir)) / self.filename

    def how_to_get(self) -> str:
        return (
            f"download {self.url} and put it at {self.default_path()}, "
            f"or pass --checkpoint PATH, or set {self.env_var}=PATH"
        )


@dataclass(frozen=True)
class ResolvedFile:
    path: Path
    sha256: str
    official: bool  # True when it matched the published size/checksums


def resolve_file(source: PublishedFile, explicit: str | os.PathLike | None = None) -> Path:
    """explicit path -> $env_var -> conventional location; ModelLoadingError naming all three."""
    if explicit is not None and str(explicit) != "":
        p = Path(os.path.expanduser(str(explicit)))
        origin = "--checkpoint"
    elif os.environ.get(source.env_var):
        p = Path(os.path.expanduser(os.environ[source.env_var]))
        origin = f"${source.env_var}"
    else:
        p = source.default_path()
        if not p.exists():
            raise ModelLoadingError(f"{source.name} weights not found: {source.how_to_get()}")
        origin = "default location"
    if not p.exists():
        raise ModelLoadingError(f"{p}: checkpoint not found (from {origin}); {source.how_to_get()}")
    if p.is_dir():
        raise ModelLoadingError(f"{p}: is a directory; expected the {source.name} checkpoint file {source.filename}")
    return p


_DIGESTS: dict[tuple[str, int, int], tuple[str, str]] = {}


def file_digests(path: str | os.PathLike) -> tuple[str, str]:
    """(md5, sha256) hex digests in one pass; memoised on (path, size, mtime) since a backbone
    may be loaded more than once per run and hashing 330 MB costs ~1 s."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        md5 = hashlib.md5(usedforsecurity=False)
        sha = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                md5.update(chunk)
                sha.update(chunk)
        _DIGESTS[key] = (md5.hexdigest(), sha.hexdigest())
    return _DIGESTS[key]


def verify_file(path: Path, source: PublishedFile) -> ResolvedFile:
    """Check size/checksums when the file claims to be the published one; hash it either way."""
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadingError(f"{path}: empty file (0 bytes); {source.how_to_get()}")
    claims_official = path.name == source.filename or (source.size is not None and size == source.size)
    if claims_official and source.size is not None and size != source.size:
        raise ModelLoadingError(
            f"{path}: {size} bytes, but the published {source.filename} is {source.size} bytes "
            f"(incomplete or corrupt download); download it again from {source.url}"
        )
    md5, sha = file_digests(path)
    if claims_official:
        bad = (source.md5 is not None and md5 != source.md5) or (source.sha256 is not None and sha != source.sha256)
        if bad:
            raise ModelLoadingError(
                f"{path}: checksum mismatch with the published {source.filename} (md5 {md5}, expected "
                f"{source.md5 or '-'}): corrupt download; download it again from {source.url}"
            )
    return ResolvedFile(path, sha, official=claims_official)


def numpy_safe_globals() -> list:
    """The NumPy callables/classes needed to unpickle plain arrays, scalars and dtypes.

    Pickles written under NumPy 1.x name ``numpy.core.multiarray``; under NumPy 2 the module is
    ``numpy._core.multiarray``: both names are mapped to the current functions. Object arrays are
    not allowed (their elements would need arbitrary globals anyway).
    """
    import numpy as np

    try:
        from numpy._core import multiarray as ma  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray as ma
    items: list[Any] = [np.ndarray, np.dtype, ma._reconstruct, ma.scalar]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        items += [(ma._reconstruct, f"{mod}._reconstruct"), (ma.scalar, f"{mod}.scalar")]
    # dtypes are rebuilt by BUILD on their concrete class (numpy.dtypes.Float64DType, ...).
    dtype_classes = {type(np.dtype(c)) for c in np.typecodes["All"] if c != "O"}
    items += sorted(dtype_classes, key=lambda t: t.__name__)
    return items


def _weights_unpickler_reason(msg: str) -> str:
    m = re.search(r"WeightsUnpickler error:\s*(.+)", msg)
    return (m.group(1) if m else msg).strip().splitlines()[0]


def load_torch_checkpoint(path: str | os.PathLike) -> Any:
    """torch.load(weights_only=True) with NumPy data allowed; every failure -> ModelLoadingError."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _weights_unpickler_reason(str(exc))
        if "Unsupported global" in reason or "allowlisted" in reason:
            m = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", reason)
            what = (m.group(1) or m.group(2)) if m else reason[:120]
            raise ModelLoadingError(
                f"{path}: the checkpoint contains Python objects other than tensors and NumPy data "
                f"({what}); embedkit will not execute pickled code. Re-save only the "
                f"state dict: torch.save({{'model': torch.load(f, weights_only=False)['model']}}, new_file)"
            ) from None
        raise ModelLoadingError(f"{path}: not a PyTorch checkpoint ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ModelLoadingError(f"{path}: unreadable PyTorch checkpoint, truncated or corrupt ({first})") from None


# --------------------------------------------------------------------------- Hugging Face hub


def hf_offline() -> bool:
    """True when the user asked the Hugging Face libraries to stay offline."""
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One bounded request to the hub endpoint (honours HF_ENDPOINT and proxy variables).

    huggingface_hub retries an unreachable hub for ~46 s before failing; this answers in at most
    ``timeout_s`` so an offline machine gets an immediate, clear error instead.
    """
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(
            urllib.request.Request(endpoint + "/api/health", method="HEAD"), timeout=timeout_s
        ).close()
        return True
    except urllib.error.HTTPError:
        return True  # the server answered (e.g. 404): the network works
    except Exception:
        return False


def looks_like_hub_id(s: str) -> bool:
    """'org/name' (no leading path markers, no backslashes, at most one slash)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", s)) and not s.startswith((".", "~"))


def dir_sha256(path: Path, names: list[str]) -> str:
    """SHA-256 over the named files of a model directory (name + content, sorted)."""
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode())
        h.update(bytes.fromhex(file_digests(path / name)[1]))
    return h.hexdigest()
