"""The one device rule: which torch device a command runs its networks on.

``--device auto`` (the default) picks CUDA when a CUDA device is usable, else Apple's MPS, else the
CPU. Artefacts never depend on the device (state dicts are saved from CPU tensors and loaded with
``map_location="cpu"``), so a store or run made on one device is usable on any other.

Parity: TF32 matmuls/convolutions are switched off on CUDA unless ``allow_tf32`` is asked for, so
fp32 results match the CPU's to float32 rounding rather than to TF32's 10-bit mantissa.

    >>> dev = resolve("auto")            # doctest: +SKIP
    >>> describe(dev)                    # doctest: +SKIP
    {'device': 'cpu', 'name': 'x86_64 (2 threads)'}
"""

from __future__ import annotations

import platform
import re
import sys

from .errors import DeviceError

CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")
#: batch multiplier on an accelerator: a GPU is only busy with many windows per forward, while
#: CPU batches are sized for cache locality. Stated policy: accelerator batch = 8 x CPU batch.
ACCELERATOR_BATCH_FACTOR = 8


def _torch():
    import torch

    return torch


def _mps_available(torch) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve(device: str | None = "auto", allow_tf32: bool = False):
    """A device name -> ``torch.device``, or DeviceError (one line) when it cannot be used here.

    device: "auto" | "cpu" | "cuda" | "cuda:N" | "mps" (None means "auto").
    allow_tf32: let CUDA use TF32 for fp32 matmuls/convolutions (faster, ~1e-3 relative error).
    """
    torch = _torch()
    name = (str(device) if device is not None else "").strip().lower() or "auto"  # a torch.device too
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda:0"
        elif _mps_available(torch):
            name = "mps"
        else:
            name = "cpu"
    if name == "cpu":
        return torch.device("cpu")
    m = _CUDA_RE.match(name)
    if m:
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise DeviceError(f"device {device!r}: CUDA is not available ({why}); use cpu or auto")
        index = int(m.group(1) or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise DeviceError(
                f"device {device!r}: there {'is' if count == 1 else 'are'} only {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
        return torch.device("cuda", index)
    if name == "mps":
        if sys.platform != "darwin":
            raise DeviceError(
                f"device 'mps': Apple's MPS exists only on macOS (this is {sys.platform}); use cpu or auto"
            )
        if not _mps_available(torch):
            raise DeviceError("device 'mps': MPS is not available in this torch build or on this Mac; use cpu")
        return torch.device("mps")
    raise DeviceError(f"unknown device {device!r}; use one of {', '.join(CHOICES)}")


def precheck(device: str | None = "auto", allow_tf32: bool = False, precision: str | None = None) -> None:
    """Fail early (DeviceError, one line) for a device or precision that cannot run here, before
    a command does any work; "auto" and "cpu" always can, so for them torch is not imported (a
    re-run with nothing to do stays free of it). The command resolves the device when it loads
    a network."""
    name = (str(device) if device is not None else "").strip().lower() or "auto"
    dev = resolve(name, allow_tf32) if name not in ("auto", "cpu") else None
    if precision is not None:
        p = (precision or "fp32").strip().lower()
        check_precision(p, dev if dev is not None else ("cpu" if name == "cpu" and p == "fp16" else None))


def describe(dev) -> dict[str, str]:
    """{"device": "cuda:0", "name": "<GPU name>"} for artefact provenance and the report."""
    torch = _torch()
    dev = torch.device(dev)
    if dev.type == "cuda":
        return {
            "device": str(dev if dev.index is not None else torch.device("cuda", 0)),
            "name": torch.cuda.get_device_name(dev),
        }
    if dev.type == "mps":
        return {"device": "mps", "name": f"Apple MPS ({platform.machine()})"}
    return {"device": "cpu", "name": f"{platform.machine() or 'cpu'} ({torch.get_num_threads()} threads)"}


def is_accelerator(dev) -> bool:
    """True for a CUDA or MPS device (a torch.device or its name; imports no torch)."""
    return str(dev).strip().lower().split(":")[0] in ("cuda", "mps")


def default_batch_size(dev, cpu_batch: int) -> int:
    """The batch size to use on ``dev`` when the user gave none (see ACCELERATOR_BATCH_FACTOR)."""
    return cpu_batch * ACCELERATOR_BATCH_FACTOR if is_accelerator(dev) else cpu_batch


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an accelerator out-of-memory error (CUDA or MPS)."""
    torch = _torch()
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_batched(fn, batch, max_batch: int, log=None):
    """Run ``fn`` over ``batch`` (anything sliceable with len) in chunks of at most ``max_batch``,
    halving the chunk after an accelerator out-of-memory error (logged through ``log``) down to
    one item; returns the list of per-chunk results in order. Raises DeviceError when even a
    single item does not fit."""
    return _run_batched(fn, batch, max_batch, log)[0]


class BackOff:
    """``run_batched`` over a stream of batches that remembers a lowered size: after one
    out-of-memory error every later batch is cut to the size that fitted (one log line per
    halving, not one per batch)."""

    def __init__(self, log=None):
        self.limit: int | None = None
        self.log = log

    def __call__(self, fn, batch) -> list:
        size = len(batch) if self.limit is None else min(self.limit, len(batch))
        out, used = _run_batched(fn, batch, size, self.log)
        if used < len(batch):
            self.limit = used
        return out


def _run_batched(fn, batch, max_batch: int, log=None):
    n = len(batch)
    size = max(1, min(max_batch, n)) if n else 1
    out, i = [], 0
    while i < n:
        try:
            out.append(fn(batch[i : i + size]))
            i += size
        except Exception as exc:  # noqa: BLE001 - only OOM is handled; everything else re-raised
            if not is_out_of_memory(exc):
                raise
            _empty_cache()
            if size == 1:
                raise DeviceError("out of accelerator memory with a batch of 1; use the cpu device") from None
            size = max(1, size // 2)
            if log is not None:
                log(f"out of accelerator memory: batch size lowered to {size}")
    return out, size


def _empty_cache() -> None:
    torch = _torch()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and _mps_available(torch) and hasattr(mps, "empty_cache"):
        mps.empty_cache()


#: inference precisions (``--precision``). fp32 is the default and the parity reference; fp16 /
#: bf16 run the network under ``torch.autocast`` (matmuls and convolutions in half precision,
#: reductions and the front-end's STFT in fp32) and are opt-in: embeddings then differ from
#: fp32 (see the README for the measured effect). fp16 autocast exists only on accelerators.
PRECISIONS = ("fp32", "fp16", "bf16")


def check_precision(precision: str | None, dev=None) -> str:
    """The precision name, or DeviceError when it is unknown or cannot run on ``dev``."""
    p = (precision or "fp32").strip().lower()
    if p not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if p == "fp16" and dev is not None and _torch().device(dev).type == "cpu":
        raise DeviceError(
            "precision 'fp16' needs an accelerator (CPU autocast supports bf16 only); use bf16 or fp32 on the cpu device"
        )
    return p


def autocast(dev, precision: str | None = "fp32"):
    """A context manager running the networks inside it at ``precision`` on ``dev``
    (a no-op for fp32: results are exactly those without it)."""
    import contextlib

    p = check_precision(precision, dev)
    if p == "fp32":
        return contextlib.nullcontext()
    torch = _torch()
    dtype = torch.float16 if p == "fp16" else torch.bfloat16
    return torch.autocast(device_type=torch.device(dev).type, dtype=dtype)


def provenance(dev, precision: str | None = "fp32", allow_tf32: bool = False) -> dict[str, object]:
    """What artefacts record about where they were computed: describe(dev) plus the precision
    and, on CUDA, whether TF32 was allowed. Never part of a store key or a run id."""
    out: dict[str, object] = {**describe(dev), "precision": check_precision(precision)}
    if _torch().device(dev).type == "cuda":
        out["allow_tf32"] = bool(allow_tf32)
    return out


def settle(model, device: str | None, allow_tf32: bool, precision: str | None, batch_size: int | None, remote: bool):
    """(device name, precision, batch size) a batch job (extract, tag) runs ``model`` with:
    the given device, else the device ``model`` (a loaded Backbone / Tagger, or None) is on, else
    the CPU; checked here (``precheck``) unless shards run remotely, where workers resolve the
    name. A remote job without a batch size gets the accelerator policy by the name alone."""
    name = str(model.device) if device is None and model is not None else (device or "cpu")
    if not remote:  # resolved for real when the network is used (a no-op re-run needs no torch)
        precheck(name, allow_tf32, precision)
    precision = check_precision(precision or (model.precision if model is not None else "fp32"))
    if batch_size is None and remote:
        batch_size = 32 * (ACCELERATOR_BATCH_FACTOR if name.startswith(("cuda", "mps")) else 1)
    return name, precision, batch_size
