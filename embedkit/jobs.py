"""How batch jobs share the CPU: one lane per core.

On a CPU, ``extract`` and ``tag`` take each track from file to result on one thread (decode,
resample, windows, forward), with ``workers`` such threads ("lanes") and the network's own
intra-op threading off while they run (torch at one thread, onnxruntime with one intra-op
thread). Decoding (libsndfile, soxr) and forwards (torch, onnxruntime) release the GIL, so N
lanes keep N cores busy:

- no stage waits for another (a pool of decode threads feeding one forward thread idles
  whenever one side is slower, and at the start and the end of every run);
- no oversubscription: decode threads next to an intra-op team of N threads put 2N threads on
  N cores, and the team's threads spin at every barrier while a decoder holds their core
  (bench/bench_tag.py measured 15-20 % of the CPU lost that way on 2 cores);
- a track's windows are forwarded on their own (chunks of ``batch_size``), so its result does
  not depend on which other tracks shared a batch or on thread timing; single-threaded
  forwards of one track's windows also cost no more per window than batches of 32 (musicnn,
  2 cores: 9.1 vs 10.4 ms per window).

An accelerator keeps the other design (decode threads feed one thread that batches windows
across files): a GPU needs large batches, and its forwards do not take a CPU core.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from .errors import EmbedkitError, require

_lock = threading.Lock()
_users = 0
_saved_threads: int | None = None
_END = object()


@contextlib.contextmanager
def torch_single_threaded() -> Iterator[None]:
    """torch's intra-op parallelism off while inside (every thread's forwards run on the calling
    thread). Process-wide and safe to nest or overlap from several threads (Dask worker threads
    each running a shard): the setting found by the first user returns when the last leaves.
    Does nothing when torch is not imported (an onnxruntime or numpy-only model)."""
    global _users, _saved_threads
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    with _lock:
        if _users == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _saved_threads is not None:
                torch.set_num_threads(_saved_threads)


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, ahead: int | None = None) -> Iterator:
    """``fn(item)`` for every item on ``workers`` threads, yielded in the items' order.

    At most ``ahead`` calls (default 2 x workers) are submitted beyond the result being
    consumed, so memory stays bounded whatever the number of items. An exception from ``fn``
    is raised at its item's turn; when the consumer stops early (or raises), calls not yet
    started are cancelled and running ones finish before this returns.
    """
    workers = max(1, int(workers))
    ahead = max(1, ahead or 2 * workers)
    it = iter(items)
    queue: deque = deque()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="embedkit-lane")
    try:
        for item in it:
            queue.append(pool.submit(fn, item))
            if len(queue) >= ahead:
                break
        while queue:
            fut = queue.popleft()
            nxt = next(it, _END)
            if nxt is not _END:
                queue.append(pool.submit(fn, nxt))
            yield fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Dask: shards of extract and tag on a cluster (each worker loads the model once)

DASK_INSTALL = "pip install 'embedkit[distributed]'"


def dask_client(
    address_or_local: str, n_workers: int | None = None, threads_per_worker: int = 1, processes: bool = True
):
    """A ``dask.distributed.Client``: ``"local"`` starts a LocalCluster on this machine (closed
    with the client), anything else is a scheduler address such as ``tcp://host:8786``.

    n_workers / threads_per_worker / processes apply to "local" only (default: one
    single-threaded worker process per CPU, so the backbones' own threads do not oversubscribe).
    Raises MissingDependencyError naming the pip command when dask is absent, EmbedkitError when
    the scheduler cannot be reached.
    """
    require("dask.distributed", DASK_INSTALL, "--dask")
    from distributed import Client

    if address_or_local.strip().lower() == "local":
        n = n_workers or max(1, os.cpu_count() or 1)
        try:
            return Client(
                n_workers=n,
                threads_per_worker=threads_per_worker,
                processes=processes,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
        except Exception as exc:
            raise EmbedkitError(f"cannot start a local Dask cluster ({type(exc).__name__}: {exc})") from None
    try:
        return Client(address_or_local, timeout="10s")
    except Exception as exc:  # OSError / TimeoutError / ValueError for a malformed address
        raise EmbedkitError(
            f"cannot reach Dask scheduler at {address_or_local!r} ({type(exc).__name__}: {exc})"
        ) from None
