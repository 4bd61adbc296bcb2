"""The one engine of the batch jobs (``embedkit extract``, ``embedkit tag``): how tracks are
scheduled on the CPU, on an accelerator and on a cluster, and what every job reports.

A job is three functions over its items (``Job``): ``decode(item)`` -> ``Decoded(windows,
info)`` or ``Failure(value)``; ``forward(windows)`` -> the network's outputs for those windows
(an array, or a dict of arrays, one row per window); ``finish(item, decoded, outputs)`` -> the
item's result (or a ``Failure``). ``run_tracks`` runs a job here and hands the results to
``on_batch(results, failures)`` in the items' order, a transaction's worth at a time;
``run_shards`` runs shards of a job on an executor (Dask or concurrent.futures), where each
worker loads its model once (``cached_model``); ``job_environment`` is what a command sets up
around a job (the decoder log, the Dask client); ``JobResult`` holds the counters every job
reports and the one rule for "nothing was done".

On a CPU, a track goes from file to result on one thread (decode, resample, windows, forward),
with ``workers`` such threads ("lanes") and the network's own intra-op threading off while
they run (torch at one thread, onnxruntime with one intra-op thread). Decoding (libsndfile,
soxr) and forwards (torch, onnxruntime) release the GIL, so N lanes keep N cores busy:

- no stage waits for another (a pool of decode threads feeding one forward thread idles
  whenever one side is slower, and at the start and the end of every run);
- no oversubscription: decode threads next to an intra-op team of N threads put 2N threads on
  N cores, and the team's threads spin at every barrier while a decoder holds their core
  (bench/bench_tag.py measured 15-20 % of the CPU lost that way on 2 cores);
- a track's windows are forwarded on their own (chunks of ``batch_size``), so its result does
  not depend on which other tracks shared a batch or on thread timing; single-threaded
  forwards of one track's windows also cost no more per window than batches of 32 (musicnn,
  2 cores: 9.1 vs 10.4 ms per window).

An accelerator keeps the other design (decode threads run ahead, bounded, and the calling
thread batches windows across tracks): a GPU needs large batches, and its forwards do not take
a CPU core. Its batches are the consecutive ``batch_size`` chunks of the tracks' windows
(``WindowBatcher``), so they do not depend on decoding speed either; an out-of-memory error
halves them (``device.BackOff``, one warning per halving).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import warnings
from collections import OrderedDict, deque
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np

from .device import BackOff
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
            head = [queue.popleft()]
            nxt = next(it, _END)
            if nxt is not _END:
                queue.append(pool.submit(fn, nxt))
            # nothing here keeps the result once handed out (the consumer may be done with it)
            yield head.pop().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# The job protocol


@dataclass
class Decoded:
    """A decoded item: its windows ([K, ...], forwarded in order) and whatever ``finish``
    needs besides the outputs (window starts, notes...)."""

    windows: np.ndarray
    info: Any = None


@dataclass
class Failure:
    """What ``decode`` (or ``finish``) returns for an item that cannot be done; ``value`` is
    what ``on_batch`` gets in its failures."""

    value: Any


class Job(Protocol):
    """What ``run_tracks`` runs. ``decode`` runs on lane / decode threads and must not raise
    for one bad item (return a ``Failure``); ``forward`` and ``finish`` run on a lane (CPU) or
    on the calling thread (accelerator). ``single_threaded()`` (optional; default
    ``torch_single_threaded``) is the context in which the network's forwards stay on the
    calling thread."""

    def decode(self, item: Any) -> Decoded | Failure: ...

    def forward(self, windows: np.ndarray) -> Any: ...

    def finish(self, item: Any, decoded: Decoded, outputs: Any) -> Any: ...


def _n_rows(out) -> int:
    return len(next(iter(out.values()))) if isinstance(out, Mapping) else len(out)


def _rows(out, a: int, b: int):
    return {k: v[a:b] for k, v in out.items()} if isinstance(out, Mapping) else out[a:b]


def concat_outputs(parts: list):
    """Forward outputs (arrays, or dicts of arrays) of consecutive windows -> one."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], Mapping):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return np.concatenate(parts)


def log_backoff(msg: str) -> None:
    """How a job reports a lowered batch size (``device.BackOff``): a warning (the CLI prints
    library warnings as one line each)."""
    warnings.warn(msg, stacklevel=2)


class WindowBatcher:
    """Windows of consecutive tracks -> forwards of exactly ``batch_size`` windows (``flush``:
    the rest), whatever the track boundaries, so the batches do not depend on how fast the
    tracks were decoded; a track's outputs come back once its last window has been forwarded.
    An accelerator out of memory halves the forwards (``backoff``, default a new
    ``device.BackOff`` logging through ``log_backoff``); the outputs are the same."""

    def __init__(self, forward: Callable[[np.ndarray], Any], batch_size: int, backoff: BackOff | None = None):
        self.forward = forward
        self.batch_size = max(1, int(batch_size))
        self.backoff = backoff if backoff is not None else BackOff(log=log_backoff)
        self._inputs: list[np.ndarray] = []  # windows not forwarded yet
        self._n_in = 0
        self._tracks: deque = deque()  # (key, n windows) waiting for their outputs
        self._outs: deque = deque()  # forwarded outputs not handed back yet
        self._n_out = 0

    def add(self, key: Any, windows: np.ndarray) -> list[tuple[Any, Any]]:
        """Queue a track's windows; returns the tracks now complete, [(key, outputs)] in order
        (outputs None for a track without windows)."""
        self._tracks.append((key, len(windows)))
        if len(windows):
            self._inputs.append(windows)
            self._n_in += len(windows)
        if self._n_in >= self.batch_size:
            buf = np.concatenate(self._inputs)
            full = len(buf) - len(buf) % self.batch_size
            for i in range(0, full, self.batch_size):
                self._run(buf[i : i + self.batch_size])
            self._inputs = [buf[full:]] if full < len(buf) else []
            self._n_in = len(buf) - full
        return self._done()

    def flush(self) -> list[tuple[Any, Any]]:
        """Forward what is left; returns every track not handed back yet."""
        if self._n_in:
            self._run(np.concatenate(self._inputs))
            self._inputs, self._n_in = [], 0
        return self._done()

    def _run(self, batch: np.ndarray) -> None:
        for out in self.backoff(self.forward, batch):
            self._outs.append(out)
            self._n_out += _n_rows(out)

    def _done(self) -> list[tuple[Any, Any]]:
        done = []
        while self._tracks and self._tracks[0][1] <= self._n_out:
            key, k = self._tracks.popleft()
            done.append((key, self._take(k) if k else None))
        return done

    def _take(self, k: int):
        parts = []
        while k:
            head = self._outs[0]
            n = _n_rows(head)
            if n <= k:
                parts.append(self._outs.popleft())
                self._n_out -= n
                k -= n
            else:
                parts.append(_rows(head, 0, k))
                self._outs[0] = _rows(head, k, n)
                self._n_out -= k
                k = 0
        return concat_outputs(parts)


# ---------------------------------------------------------------------------------------------
# Running a job here

_EMPTY = object()  # an empty group's place in the flattened stream


class _Commit:
    """Results and failures waiting for ``on_batch``. Ungrouped: sent once the results hold
    ``batch_size`` windows or there are ``batch_size`` failures (and at the end); grouped: once
    per group."""

    def __init__(self, on_batch, batch_size: int, grouped: bool):
        self.on_batch, self.batch_size, self.grouped = on_batch, batch_size, grouped
        self.results: list = []
        self.fails: list = []
        self.n_windows = 0

    def add(self, result, n_windows: int) -> None:
        if isinstance(result, Failure):
            self.fails.append(result.value)
        else:
            self.results.append(result)
            self.n_windows += n_windows
        if not self.grouped and (self.n_windows >= self.batch_size or len(self.fails) >= self.batch_size):
            self.send()

    def end_group(self) -> None:
        if self.grouped or self.results or self.fails:
            self.send()

    def send(self) -> None:
        results, fails = self.results, self.fails
        self.results, self.fails, self.n_windows = [], [], 0
        self.on_batch(results, fails)


def _flatten(groups) -> Iterator[tuple[Any, bool]]:
    """(item, last of its group) for every item; an empty group is one (_EMPTY, True)."""
    for g in groups:
        it = iter(g)
        cur = next(it, _END)
        if cur is _END:
            yield _EMPTY, True
            continue
        for nxt in it:
            yield cur, False
            cur = nxt
        yield cur, True


def _single_threaded(job):
    fn = getattr(job, "single_threaded", None)
    return fn() if fn is not None else torch_single_threaded()


def _close(it) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


def run_tracks(
    job: Job,
    items: Iterable,
    on_batch: Callable[[list, list], None],
    *,
    accelerator: bool = False,
    workers: int = 1,
    batch_size: int = 32,
    grouped: bool = False,
    ahead: int | None = None,
    one_thread: bool | None = None,
) -> None:
    """Run ``job`` over ``items`` here; ``on_batch(results, failures)`` gets every result and
    every failure value in the items' order, on the calling thread.

    CPU (``accelerator`` False): ``workers`` lanes (``ordered_map``; one lane runs on the
    calling thread), each taking a track from decode to ``finish``, its windows forwarded on
    their own in chunks of ``batch_size``: a result never depends on ``workers`` or on the
    other tracks. With more than one lane (or ``one_thread`` True: a shard on a Dask worker
    thread, which is one lane of its cluster) the forwards run in ``job.single_threaded()``.
    Accelerator: ``workers`` threads decode up to ``ahead`` tracks (default 2 x workers, at
    least 4) ahead of the calling thread, which forwards the windows across tracks in
    consecutive chunks of ``batch_size`` (``WindowBatcher``, halved on out-of-memory).

    Transactions: ``on_batch`` is called once the finished results hold ``batch_size``
    windows or there are ``batch_size`` failures, and at the end (never with nothing). With
    ``grouped``, ``items`` is an iterable of groups (sequences of items, e.g. the shards of a
    store): ``on_batch`` is called exactly once per group, with that group's results, and
    neither batches nor the back-off's lowered size span two groups (a group's outputs depend
    on that group alone).

    Nothing of a finished track is kept here; an exception (from the job, ``on_batch`` or
    Ctrl-C) stops the run, the tracks not started are cancelled and running ones finish first.
    """
    workers = max(1, int(workers))
    batch_size = max(1, int(batch_size))
    if grouped:
        groups = list(items)
        n = sum(len(g) for g in groups) if all(hasattr(g, "__len__") for g in groups) else None
    else:
        groups = [items]
        n = len(items) if hasattr(items, "__len__") else None
    commit = _Commit(on_batch, batch_size, grouped)
    flat = _flatten(groups)
    if accelerator:
        _run_batched(job, flat, commit, workers, batch_size, ahead or max(2 * workers, 4))
    else:
        lanes = workers if n is None else max(1, min(workers, n))
        _run_lanes(job, flat, commit, lanes, batch_size, lanes > 1 if one_thread is None else one_thread)


def _track(job: Job, item, batch_size: int) -> tuple[Any, int]:
    """A lane's work on one item: (result or Failure, windows forwarded)."""
    d = job.decode(item)
    if isinstance(d, Failure):
        return d, 0
    w = d.windows
    outs = [job.forward(w[i : i + batch_size]) for i in range(0, len(w), batch_size)]
    return job.finish(item, d, concat_outputs(outs) if outs else None), len(w)


def _run_lanes(job: Job, flat, commit: _Commit, lanes: int, batch_size: int, single: bool) -> None:
    def one(entry):
        item, last = entry
        if item is _EMPTY:
            return _EMPTY, 0, last
        return (*_track(job, item, batch_size), last)

    with _single_threaded(job) if single else contextlib.nullcontext():
        done = ordered_map(one, flat, lanes) if lanes > 1 else map(one, flat)
        try:
            for result, k, last in done:
                if result is not _EMPTY:
                    commit.add(result, k)
                if last:
                    commit.end_group()
        finally:
            _close(done)


def _run_batched(job: Job, flat, commit: _Commit, workers: int, batch_size: int, ahead: int) -> None:
    def decode(entry):
        item, last = entry
        return item, last, (_EMPTY if item is _EMPTY else job.decode(item))

    def finish(done: list) -> None:
        for n in range(len(done)):
            (item, d), out = done[n]
            done[n] = None
            k = len(d.windows)
            result = job.finish(item, d, out)
            del d, out  # nothing of the finished track is kept while on_batch runs
            commit.add(result, k)

    decoded = ordered_map(decode, flat, workers, ahead)
    batcher = WindowBatcher(job.forward, batch_size)
    try:
        for item, last, d in decoded:
            if isinstance(d, Failure):
                commit.add(d, 0)
            elif d is not _EMPTY:
                ready = batcher.add((item, d), d.windows)
                d = None
                finish(ready)
            if last:
                finish(batcher.flush())
                commit.end_group()
                batcher = WindowBatcher(job.forward, batch_size)  # a group's batches and back-off are its own
    finally:
        decoded.close()


# ---------------------------------------------------------------------------------------------
# Running shards of a job elsewhere


def is_dask(executor) -> bool:
    """True for a ``dask.distributed.Client``."""
    return type(executor).__module__.split(".")[0] == "distributed"


def as_completed(executor, futures) -> Iterator:
    """``futures`` in the order they finish, for a Dask client or a concurrent.futures executor."""
    if is_dask(executor):
        from distributed import as_completed as dask_as_completed

        return iter(dask_as_completed(futures))
    from concurrent.futures import as_completed as cf_as_completed

    return cf_as_completed(futures)


def run_shards(
    executor, fn: Callable, shards: Iterable[tuple[Any, tuple]], on_done: Callable[[Any, Any], None]
) -> None:
    """``fn(*args)`` for every ``(key, args)`` of ``shards`` on ``executor`` (a Dask client, or
    any object with ``submit`` returning concurrent.futures futures), then ``on_done(key,
    result)`` on this thread as each finishes (completion order). Dask tasks are submitted
    with ``pure=False`` (Dask hashes arguments into task keys: an identical shard submitted
    earlier in the session is a fresh task). When a shard or ``on_done`` raises (Ctrl-C
    included), the shards not started yet are cancelled and the error propagates."""
    kw = {"pure": False} if is_dask(executor) else {}
    futures: dict = {}
    try:
        for key, args in shards:
            futures[executor.submit(fn, *args, **kw)] = key
        for fut in as_completed(executor, list(futures)):
            on_done(futures[fut], fut.result())
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise


#: models a worker process keeps loaded (``cached_model``)
MODEL_CACHE_SIZE = 4
_models: OrderedDict = OrderedDict()
_models_lock = threading.Lock()


def cached_model(
    load: Callable[..., Any],
    model,
    checkpoint: str | None = None,
    device: str = "cpu",
    precision: str = "fp32",
    allow_tf32: bool = False,
):
    """``load(model, checkpoint=, device=, precision=, allow_tf32=)``, once per process for each
    (loader, model, checkpoint, device, precision, allow_tf32): a Dask worker loads a model
    for its first shard and keeps it for the next (the last ``MODEL_CACHE_SIZE`` models). Each
    key has its own instance (moving a model to a device changes it in place). Loads are
    serialised, so worker threads wanting the same model load it once."""
    key = (
        f"{getattr(load, '__module__', '')}.{getattr(load, '__qualname__', repr(load))}",
        str(model),
        checkpoint,
        str(device),
        precision,
        bool(allow_tf32),
    )
    with _models_lock:
        if key in _models:
            _models.move_to_end(key)
            return _models[key]
        m = load(model, checkpoint=checkpoint, device=device, precision=precision, allow_tf32=allow_tf32)
        _models[key] = m
        while len(_models) > MODEL_CACHE_SIZE:
            _models.popitem(last=False)
        return m


# ---------------------------------------------------------------------------------------------
# What every job reports


@dataclass(kw_only=True)
class JobResult:
    """The counters every batch job reports. A job's result class adds its own fields and
    names two of them: ``n_inputs`` (inputs of the run) and ``n_done`` (inputs this run did)."""

    n_done_before: int = 0  # inputs whose result an earlier run had already stored
    n_failed_before: int = 0  # inputs recorded as failed by an earlier run (skipped)
    failures: list[dict] = field(default_factory=list)  # this run's failures
    seconds: float = 0.0
    device: dict = field(default_factory=dict)  # embedkit.device.provenance of the forwards run here

    @property
    def n_inputs(self) -> int:
        raise NotImplementedError

    @property
    def n_done(self) -> int:
        raise NotImplementedError

    @property
    def n_failed(self) -> int:
        return len(self.failures)

    @property
    def n_failed_total(self) -> int:
        """Failures of this run and of earlier ones."""
        return self.n_failed + self.n_failed_before

    @property
    def n_available(self) -> int:
        """Inputs that now have a result (this run's or an earlier one's)."""
        return self.n_done_before + self.n_done

    @property
    def nothing_done(self) -> bool:
        """The one rule for a run that produced nothing usable: no input has a result, neither
        from this run nor from an earlier one (every input failed, now or before, or there
        were none). Commands exit non-zero on it."""
        return self.n_available == 0


# ---------------------------------------------------------------------------------------------
# What a command sets up around a job


@dataclass
class JobEnvironment:
    """What ``job_environment`` yields. Set ``log_home`` once the job knows where it lives (a
    store): a non-empty decoder log is appended there when the job succeeds."""

    log_path: Path  # where native libraries' fd-2 output goes during the job
    executor: Any = None  # the Dask client with --dask, else None
    log_home: Path | None = None
    kept: Path | None = None  # after the job: where the decoder log is (None: it was empty, removed)

    @property
    def note(self) -> str:
        """'decoder messages: PATH' when native code said something, else ''."""
        return f"decoder messages: {self.kept}" if self.kept is not None else ""


@contextlib.contextmanager
def job_environment(dask: str | None = None) -> Iterator[JobEnvironment]:
    """A command's setting for a batch job: what C libraries write to fd 2 (libmpg123's "Xing
    stream size off", once per MP3 in FMA) goes to a decoder log instead of between progress
    lines (``audio.decoding.native_stderr_to``), and with ``dask`` (a scheduler address or
    "local") ``executor`` is a Dask client, closed afterwards.

    The log's rule: an empty log is removed; a non-empty one is always kept, since it is the
    only record of what native decoders said (it often explains a file's failure) and it was
    kept off the terminal. On success it is appended to ``log_home`` when the job set one
    (extract: ``<store>/decoder.log``), else left where it is; ``kept`` / ``note`` say where.
    On failure it stays at its temporary path, which is printed to stderr."""
    from .audio.decoding import native_stderr_to

    fd, name = tempfile.mkstemp(prefix="embedkit-decoder-", suffix=".log")
    os.close(fd)
    env = JobEnvironment(Path(name))
    try:
        with contextlib.ExitStack() as stack:
            if dask:
                env.executor = stack.enter_context(dask_client(dask))
            stack.enter_context(native_stderr_to(env.log_path))
            yield env
    except BaseException:
        if _size(env.log_path):
            env.kept = env.log_path
            print(f"native library messages: {env.log_path}", file=sys.stderr)
        else:
            env.log_path.unlink(missing_ok=True)
        raise
    env.kept = _keep_log(env.log_path, env.log_home)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _keep_log(log: Path, home: Path | None) -> Path | None:
    if not _size(log):
        log.unlink(missing_ok=True)
        return None
    if home is None:
        return log
    try:
        home.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "rb") as src, open(home, "ab") as dst:
            shutil.copyfileobj(src, dst)
    except OSError:
        return log  # the store cannot take it: the log stays where it is
    log.unlink(missing_ok=True)
    return home


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
