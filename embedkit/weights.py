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

Weights shipped inside a wheel whose metadata we do not want in the environment (musicnn 0.1.0
pins numpy<1.17 and TensorFlow) are unpacked from the wheel file instead of pip-installing it:
:func:`install_wheel_files` / :func:`install_musicnn`, also as a command that
``scripts/install.sh`` runs after ``pip download``::

    python -m embedkit.weights install-musicnn WHEEL_OR_DIR [--dest DIR]
    python -m embedkit.weights check-musicnn      # where embedkit finds them, SHA-256s checked

Neither downloads anything: only the install script does.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import re
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import ModelLoadingError, first_line


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
        raise ModelLoadingError(
            f"{path}: unreadable PyTorch checkpoint, truncated or corrupt ({first_line(exc, 160)})"
        ) from None


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


# --------------------------------------------------------------------------- files from a wheel


def find_wheel(source: str | os.PathLike, project: str) -> Path:
    """``source`` itself when it is a file, else the one ``<project>-*.whl`` in the folder
    ``source`` (what ``pip download --no-deps <project>==X -d DIR`` leaves in DIR)."""
    p = Path(os.path.expanduser(str(source)))
    if p.is_file():
        return p
    if p.is_dir():
        wheels = sorted(p.glob(f"{project}-*.whl"))
        if len(wheels) == 1:
            return wheels[0]
        raise ModelLoadingError(f"{p}: expected one {project}-*.whl in this folder, found {len(wheels)}")
    raise ModelLoadingError(f"{p}: no such file or folder")


def _wheel_record(z: zipfile.ZipFile) -> dict[str, tuple[str, int]]:
    """member -> (sha256 hex, size) from the wheel's ``*.dist-info/RECORD`` ({} without one)."""
    names = [n for n in z.namelist() if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]
    if len(names) != 1:
        return {}
    out = {}
    for row in csv.reader(io.TextIOWrapper(z.open(names[0]), encoding="utf-8")):
        if len(row) >= 3 and row[1].startswith("sha256=") and row[2].isdigit():
            b64 = row[1].removeprefix("sha256=")
            out[row[0]] = (base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex(), int(row[2]))
    return out


def install_wheel_files(
    wheel: str | os.PathLike, dest: str | os.PathLike, members: dict[str, str], sha256: dict[str, str]
) -> list[Path]:
    """Unpack selected files of a wheel (a zip) into ``dest`` without installing the wheel.

    members: wheel member -> path under ``dest``; a member ending in "/" is a folder taken whole
    (its target ends in "/" too). Each must be in the wheel.
    sha256: path under ``dest`` -> expected SHA-256; each must be unpacked and match. Every other
    file is checked against the wheel's RECORD (when it lists it), against a damaged download.

    Everything is unpacked and checked in a staging folder next to ``dest`` first; only then is
    each top-level entry of ``dest`` that the wheel provides replaced, so a bad wheel leaves
    ``dest`` as it was and other files in ``dest`` are never touched. Returns the files written.
    Every failure is one ModelLoadingError line.
    """
    wheel, dest = Path(wheel), Path(os.path.expanduser(str(dest)))
    try:
        z = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelLoadingError(f"{wheel}: not a readable wheel ({exc})") from None
    with z:
        record = _wheel_record(z)
        plan: dict[str, str] = {}  # member -> path under dest
        for member, target in members.items():
            if member.endswith("/"):
                hits = {n: target + n[len(member) :] for n in z.namelist() if n.startswith(member) and n[-1] != "/"}
            else:
                hits = {member: target} if member in z.NameToInfo else {}
            if not hits:
                raise ModelLoadingError(f"{wheel}: has no {member}; not the expected wheel, nothing installed")
            plan.update(hits)
        for rel in plan.values():
            pp = PurePosixPath(rel)
            if pp.is_absolute() or ".." in pp.parts or "\\" in rel:
                raise ModelLoadingError(f"{wheel}: unsafe member path {rel!r}; nothing installed")
        missing = sorted(set(sha256) - set(plan.values()))
        if missing:
            raise ModelLoadingError(f"{wheel}: has no file for {missing[0]}; not the expected wheel, nothing installed")
        dest.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
        try:
            new, old = stage / "new", stage / "old"
            for member, rel in plan.items():
                out = new / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                h, size = hashlib.sha256(), 0
                try:
                    with z.open(member) as src, open(out, "wb") as dst:
                        while chunk := src.read(1 << 20):
                            h.update(chunk)
                            dst.write(chunk)
                            size += len(chunk)
                except (zipfile.BadZipFile, EOFError, OSError) as exc:
                    raise ModelLoadingError(f"{wheel}: cannot read {member} ({exc}); nothing installed") from None
                digest = h.hexdigest()
                want = sha256.get(rel)
                if want is not None and digest != want:
                    raise ModelLoadingError(
                        f"{wheel}: {member} has SHA-256 {digest[:12]}..., not the published "
                        f"{want[:12]}... (corrupt or different wheel); nothing installed"
                    )
                if member in record and record[member] != (digest, size):
                    raise ModelLoadingError(
                        f"{wheel}: {member} does not match the wheel's RECORD (damaged download); nothing installed"
                    )
            dest.mkdir(parents=True, exist_ok=True)
            old.mkdir()
            for entry in sorted(new.iterdir()):
                target = dest / entry.name
                if target.exists() or target.is_symlink():
                    target.rename(old / entry.name)
                entry.rename(target)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return sorted(dest / rel for rel in plan.values())


def install_musicnn(source: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """Unpack the musicnn checkpoints from the musicnn 0.1.0 wheel (``source``: the .whl or a
    folder holding it) into ``dest`` (default: the first writable folder of embedkit's lookup
    order, see ``embedkit.backbones.musicnn.package_dir``), each file embedkit reads checked
    against its published SHA-256. Returns the folder. Never downloads."""
    from .backbones import musicnn as m

    wheel = find_wheel(source, "musicnn")
    root = Path(os.path.expanduser(str(dest))) if dest else m.default_install_dir()
    install_wheel_files(wheel, root, m.WHEEL_MEMBERS, m.published_sha256())
    return root


def check_musicnn() -> dict[str, Path]:
    """backbone name -> the folder its checkpoint loads from, after checking every file embedkit
    reads there against its published SHA-256. ModelLoadingError when one is missing or differs."""
    from .backbones import musicnn as m

    published = m.published_sha256()
    out = {}
    for name, folder in m._MODEL_DIR.items():
        root = m.package_dir(name)
        for rel in (f"{folder}/{m.DATA_FILE}", f"{folder}/.index", "configuration.py"):
            p = root / rel
            if not p.is_file():
                raise ModelLoadingError(f"{p}: missing; reinstall the musicnn checkpoints with `{m.INSTALL}`")
            if file_digests(p)[1] != published[rel]:
                raise ModelLoadingError(
                    f"{p}: not the published musicnn 0.1.0 file (SHA-256 differs); reinstall with `{m.INSTALL}`"
                )
        out[name] = root
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m embedkit.weights install-musicnn WHEEL_OR_DIR [--dest DIR] | check-musicnn``."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m embedkit.weights",
        description="Install or check weights that embedkit loads from outside its package. Nothing is downloaded.",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    inst = sub.add_parser(
        "install-musicnn", help="unpack and verify the musicnn checkpoints from the musicnn 0.1.0 wheel"
    )
    inst.add_argument("source", help="musicnn-0.1.0-py3-none-any.whl, or a folder holding it (pip download -d DIR)")
    inst.add_argument(
        "--dest",
        help="target folder (default: $EMBEDKIT_MUSICNN_DIR, <sys.prefix>/share/embedkit/musicnn "
        "when writable, else ~/.cache/embedkit/musicnn)",
    )
    sub.add_parser(
        "check-musicnn", help="print where the musicnn checkpoints load from, SHA-256s checked; exit 1 if none"
    )
    args = ap.parse_args(argv)
    try:
        if args.cmd == "install-musicnn":
            root = install_musicnn(args.source, args.dest)
            print(f"musicnn checkpoints verified and unpacked into {root}")
        else:
            for name, root in check_musicnn().items():
                print(f"{name}: {root}")
    except ModelLoadingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
