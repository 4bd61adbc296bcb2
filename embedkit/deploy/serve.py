"""HTTP tagging service: ``embedkit serve RUN_OR_ONNX [--host 127.0.0.1 --port 8000]``.

Endpoints (FastAPI; OpenAPI docs at /docs and /openapi.json):

- ``POST /v1/tag``: an audio file as a multipart upload (any field name; the first part with a
  file name, else the first part) or as the raw request body. Query options: ``excerpt``
  (first | middle | spread:N | full, as ``embedkit tag``), ``top_k``, and the decision rule's
  overrides with ``embedkit tag``'s names and meanings: ``threshold``, ``multi``,
  ``multi_threshold``, ``margin``, ``max_genres``, ``not_music`` (``embedkit.calibration.DecisionRule``).
  Answer: the track's record (``embedkit.deploy.records.TrackResult.to_json``: decision, genres
  decided, topk, probabilities, the rule applied, model id, what was listened to), the file
  name and timings (ms).
- ``GET /v1/model``: labels, kind, spec, window / clip contract, the default rule, metadata.
- ``GET /healthz``; ``GET /metrics`` (Prometheus text format); ``GET /``: a page for people.

How a request runs. The body is streamed to a spool file (never held in memory) in a directory
the server owns (``--spool-dir``; default ``<temp>/embedkit-serve-<uid>/<pid>-*``, removed at exit,
and the directory of a server that died, OOM-killed or kill -9, is removed when the next one
starts: its lock is no longer held), with a size limit (413, checked against Content-Length
first and while streaming) and two timeouts (408: ``body_timeout_s`` for the whole body,
``chunk_timeout_s`` without a byte; the message says which). Decoding runs in a thread pool
off the event loop and decodes only the excerpt (``read_bounded``: for first / middle /
spread:N ``embedkit.audio.excerpts.read_excerpt``, the same code as ``embedkit tag``; for full
the same decode and windowing, stopped at the bound below), so a 3-hour upload costs its 30 s
excerpt. The model is loaded once and shared.

Work per request is bounded by configuration, and refused before any decoding beyond it:
``max_windows`` (default 256) windows and ``max_audio_s`` (default 600 s) seconds of audio
decoded; ``spread:N`` beyond either is refused with 422 before the body is read, ``full`` on
audio longer than ``max_audio_s`` with 413 (from the header, and the decode itself stops at
the bound, so a lying header cannot make it read more); sample rates outside 8000..384000 Hz
get 422. The upload limit defaults to ``max_audio_s`` of CD audio as WAV (176,400 bytes/s:
106 MB for 600 s). All requests together hold at most ``max_held_windows`` decoded windows
(default 2 x ``max_windows``); a request waits for its share before it decodes, so the
memory of decoded audio is bounded whatever the clients do, and freed heap pages are handed
back to the system after a large request (glibc ``malloc_trim``), so memory is flat afterwards.

Fairness. A body being uploaded is not yet work: it takes an upload place, not one of the
``max_pending`` places of requests being decoded / waiting / run, so idle or slow uploads
cannot make complete requests wait or get 503. Upload places are bounded in all
(``max_uploads``, default 64) and per client address (``max_uploads_per_client``, default 16);
when a client, or the server, has no free place, the slowest upload that has sent nothing for
``idle_evict_s`` (default 1 s), or averaged under ``min_upload_rate`` (16 KiB/s) over at least
that long, is ended with 408 and gives its place to the new one; when every upload is sending
briskly, the new one gets 429 (that client) or 503 (the server) with ``Retry-After``. This
holds where the per-address cap cannot tell clients apart (every local client is 127.0.0.1):
32 idle uploads from one address leave an honest request of the same address, which sends its
body at once, a place after at most ``idle_evict_s``. Spool files are bounded per upload by
the size limit, and in all by ``max_uploads`` of it.

Security defaults for a local service. ``Host`` must name the server (``allowed_hosts``;
default: localhost, 127.0.0.1, ::1, and the bind address): another host gets 421, so a page
that rebinds its DNS name to 127.0.0.1 cannot use the service. A request carrying ``Origin``
(a browser) must come from the page the server itself serves or from ``allowed_origins``:
a cross-site POST gets 403. With ``token`` (``--token`` / ``EMBEDKIT_SERVE_TOKEN``) every
endpoint but ``/`` and ``/healthz`` needs ``Authorization: Bearer TOKEN`` (401 without); the
CLI refuses a non-loopback ``--host`` without a token unless ``--insecure-no-token`` says so.

Batching policy: one inference thread runs the model. Requests whose windows are ready while
it is busy, or within ``batch_wait_ms`` (default 5 ms) of the first, are run as one forward
of up to ``max_batch_windows`` windows (default 64); a request is never split. Admission: at
most ``max_pending`` requests (default 32) whose body is complete are in the service at once
(decoding, waiting or running); one more gets 503 with ``Retry-After`` at once, so clients
back off instead of timing out.

Errors, for every status and path (404 and 405 included), are JSON
``{"error": {"kind", "message"}}`` with one-line messages: 400 bad option or empty body, 401
no or wrong token, 403 cross-site origin, 404 no such path, 405 wrong method, 408 body too
slow or idle, 413 too large (bytes or seconds of audio), 415 unsupported format, 421 unknown
Host, 422 not decodable / truncated / silent / too short audio, or more work than the limits,
429 / 503 busy, 500 anything unforeseen (the server keeps serving). ``--db`` writes every
result into the results database of ``embedkit tag``.
"""

# no `from __future__ import annotations`: FastAPI resolves the endpoint annotations at runtime

import asyncio
import hmac
import ipaddress
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..audio.decoding import known_not_audio
from ..audio.excerpts import DEFAULT_EXCERPT
from ..errors import AudioError, EmbedkitError, first_line
from ..processes import alive
from .stream import MAX_CHANNELS, RATE_RANGE  # the sample rates and channels audio may have

SERVE_INSTALL = "pip install 'embedkit[serve]'"
#: Content-Types accepted for a raw body or an upload part (besides audio/*)
GENERIC_TYPES = ("application/octet-stream", "binary/octet-stream", "")
#: bytes per second of CD audio as 16-bit stereo WAV: the default upload limit is
#: ``max_audio_s`` of it, the largest uncompressed song the decode bound accepts
CD_BYTES_PER_S = 44100 * 2 * 2
#: Host names every server answers to (with any port); the bind address is added
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: environment variable read for the token when ``--token`` is not given
TOKEN_ENV = "EMBEDKIT_SERVE_TOKEN"
#: shortest token accepted: 16 characters (``python -c "import secrets; print(secrets.token_urlsafe(32))"``)
MIN_TOKEN = 16


@dataclass
class ServeConfig:
    """Limits and policy of the service (CLI flags of ``embedkit serve``; see the module doc)."""

    max_bytes: int | None = None  # 413 above; None: max_audio_s of CD audio as WAV (106 MB)
    body_timeout_s: float = 30.0  # 408 when the whole body takes longer
    chunk_timeout_s: float = 10.0  # 408 when no byte arrives for this long
    max_pending: int = 32  # complete requests in the service; 503 + Retry-After above
    max_windows: int = 256  # windows one request may tag (spread:N beyond: 422)
    max_audio_s: float = 600.0  # seconds of audio one request may decode (full beyond: 413)
    max_held_windows: int | None = None  # decoded windows held by all requests; None: 2 x max_windows
    max_uploads: int = 64  # bodies being received at once, all clients
    max_uploads_per_client: int = 16  # ... from one client address
    idle_evict_s: float = 1.0  # when full, an upload idle this long gives its place (408)
    min_upload_rate: float = 16384.0  # ... or one slower than this on average, bytes/s
    spool_dir: str | None = None  # None: <temp>/embedkit-serve-<uid>
    token: str | None = None  # Authorization: Bearer TOKEN on every endpoint but / and /healthz
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS  # Host header names ("*": any)
    allowed_origins: tuple[str, ...] = ()  # besides the server's own page ("*": any)
    batch_wait_ms: float = 5.0
    max_batch_windows: int = 64
    decode_workers: int = 2
    excerpt: str = DEFAULT_EXCERPT  # the same as `embedkit tag`'s
    top_k: int = 3
    # the server's decision rule: the model's with these overrides (None keeps the model's);
    # a request's query parameters of the same names override it again
    threshold: float | None = None
    multi: bool | None = None
    multi_threshold: float | None = None
    margin: float | None = None
    max_genres: int | None = None
    not_music: float | None = None
    retry_after_s: int = 1
    db: str | None = None

    def __post_init__(self):
        if self.max_bytes is None:
            self.max_bytes = int(self.max_audio_s * CD_BYTES_PER_S)
        if self.max_held_windows is None:
            self.max_held_windows = 2 * self.max_windows
        self.allowed_hosts = tuple(h.lower().strip("[]") for h in self.allowed_hosts)
        self.allowed_origins = tuple(o.lower().rstrip("/") for o in self.allowed_origins)
        if self.token is not None and len(self.token) < MIN_TOKEN:
            raise EmbedkitError(
                f"the token must have at least {MIN_TOKEN} characters; make one with "
                'python -c "import secrets; print(secrets.token_urlsafe(32))"'
            )
        small = {
            "max_bytes": self.max_bytes,
            "max_windows": self.max_windows,
            "max_pending": self.max_pending,
            "max_uploads": self.max_uploads,
            "max_uploads_per_client": self.max_uploads_per_client,
        }
        for name, v in small.items():
            if int(v) < 1:
                raise EmbedkitError(f"{name} must be >= 1, got {v}")
        if not (self.max_audio_s > 0 and self.body_timeout_s > 0 and self.chunk_timeout_s > 0):
            raise EmbedkitError("max_audio_s, body_timeout_s and chunk_timeout_s must be positive")
        if self.max_held_windows < self.max_windows:
            raise EmbedkitError(
                f"max_held_windows ({self.max_held_windows}) must be >= max_windows ({self.max_windows})"
            )


class HTTPProblem(Exception):
    """An error answered as JSON with ``status`` and a one-line ``message``."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, " ".join(str(message).split()), headers or {}


def _require_serve():
    from ..errors import require

    for mod in ("fastapi", "uvicorn", "prometheus_client", "python_multipart"):
        require(mod, SERVE_INSTALL, "embedkit serve")


# ---------------------------------------------------------------------------------------------
# metrics


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in a process)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        lat = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
        self.requests = Counter(
            "embedkit_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "embedkit_request_seconds", "Latency of POST /v1/tag (receive to answer)", buckets=lat, registry=r
        )
        self.decode = Histogram(
            "embedkit_decode_seconds", "Decoding + windowing time per request", buckets=lat, registry=r
        )
        self.inference = Histogram(
            "embedkit_inference_seconds", "Model time per forward (one batch)", buckets=lat, registry=r
        )
        self.batch = Histogram(
            "embedkit_batch_requests", "Requests per forward", buckets=(1, 2, 4, 8, 16, 32), registry=r
        )
        self.tagged = Counter("embedkit_tagged_total", "Tracks tagged", registry=r)
        self.uncertain = Counter("embedkit_uncertain_total", "Tracks whose decision was 'uncertain'", registry=r)
        self.errors = Counter("embedkit_errors_total", "Failed requests by kind", ["kind"], registry=r)
        self.pending = Gauge("embedkit_pending_requests", "Requests in the service now", registry=r)
        from .monitor import DecisionMetrics

        # confidence, not-music score, decisions per genre and the rates `embedkit monitor` checks
        self.decisions = DecisionMetrics(r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------------------------------
# batching


@dataclass
class _Job:
    windows: np.ndarray
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Runs ``tagger.score_segments`` on one thread, joining concurrent requests (see the
    module doc for the policy). ``submit(windows)`` -> (probabilities [K, C], queue s, model s,
    not-music scores [K] or None)."""

    def __init__(self, tagger, metrics: Metrics, wait_ms: float, max_windows: int):
        self.tagger, self.metrics = tagger, metrics
        self.wait_s, self.max_windows = wait_ms / 1000.0, max(1, int(max_windows))
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="embedkit-model")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def submit(self, windows: np.ndarray):
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(windows, fut))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Job | None = None
        while True:
            first = carry or await self.queue.get()
            carry = None
            jobs, n = [first], len(first.windows)
            deadline = loop.time() + self.wait_s
            while n < self.max_windows:
                timeout = deadline - loop.time()
                try:
                    job = self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                if n + len(job.windows) > self.max_windows:
                    carry = job  # starts the next batch: a request is never split
                    break
                jobs.append(job)
                n += len(job.windows)
            x = np.concatenate([j.windows for j in jobs])
            t0 = time.perf_counter()
            try:
                p, nm = await loop.run_in_executor(self.pool, self.tagger.score_segments, x)
            except Exception as exc:  # noqa: BLE001 - answered per request, the loop keeps going
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                x = jobs = first = job = j = None
                continue
            model_s = time.perf_counter() - t0
            self.metrics.inference.observe(model_s)
            self.metrics.batch.observe(len(jobs))
            at = 0
            for j in jobs:
                k = len(j.windows)
                if not j.future.done():
                    part = None if nm is None else nm[at : at + k].copy()
                    j.future.set_result((p[at : at + k].copy(), t0 - j.queued, model_s, part))
                at += k
            # nothing of this batch may outlive it: idle, the loop would hold its windows (up
            # to max_held_windows of audio) until the next request
            x = p = nm = jobs = first = job = j = None


# ---------------------------------------------------------------------------------------------
# request bodies


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _check_type(media: str, where: str) -> None:
    if media.startswith(("audio/", "video/")) or media in GENERIC_TYPES:  # a video: its soundtrack
        return
    raise HTTPProblem(
        415,
        "unsupported_media_type",
        f"{where}: Content-Type {media!r} is not audio; send an audio file (MP3, M4A, FLAC, WAV, OGG, Opus, ...) as audio/* or application/octet-stream",
    )


def _sniff(path: str) -> None:
    with open(path, "rb") as fh:
        head = fh.read(12)
    name = known_not_audio(head)  # a file that is not audio is answered 415, not 422
    if name is not None:
        raise HTTPProblem(415, "unsupported_media_type", f"upload is {name}, not audio; send an audio file")


class _Sink:
    """Writes the audio bytes of a raw body or of one multipart part to a temporary file."""

    def __init__(self, request_type: str, directory: str | None):
        self.fh = tempfile.NamedTemporaryFile(prefix="embedkit-upload-", suffix=".bin", dir=directory, delete=False)
        self.path = self.fh.name
        self.bytes = 0
        self.filename: str | None = None
        self.part_type = ""
        self.multipart = request_type == "multipart/form-data"
        self.parser = None

    def start_multipart(self, content_type: str) -> None:
        from python_multipart.multipart import MultipartParser, parse_options_header

        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise HTTPProblem(400, "bad_request", "multipart/form-data without a boundary")
        state = {"part": -1, "chosen": None, "field": b"", "headers": {}}
        self._state = state

        def on_part_begin():
            state["part"] += 1
            state["headers"] = {}

        def on_header_field(data, start, end):
            state["field"] = data[start:end].lower()

        def on_header_value(data, start, end):
            state["headers"][state["field"]] = state["headers"].get(state["field"], b"") + data[start:end]

        def on_headers_finished():
            if state["chosen"] is not None:
                return
            disp = state["headers"].get(b"content-disposition", b"")
            _, opts = parse_options_header(disp)
            if b"filename" in opts or state["part"] == 0:
                state["chosen"] = state["part"]
                self.filename = opts.get(b"filename", b"").decode("utf-8", "replace") or None
                self.part_type = _media_type(state["headers"].get(b"content-type", b"").decode("latin-1"))

        def on_part_data(data, start, end):
            if state["chosen"] == state["part"]:
                self.fh.write(data[start:end])
                self.bytes += end - start

        def on_part_end():
            pass

        callbacks = {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def feed(self, chunk: bytes) -> None:
        if self.parser is not None:
            try:
                self.parser.write(chunk)
            except Exception as exc:  # python-multipart raises its own errors on bad framing
                raise HTTPProblem(
                    400, "bad_request", f"malformed multipart body ({first_line(exc, with_type=True)})"
                ) from None
        else:
            self.fh.write(chunk)
            self.bytes += len(chunk)

    def finish(self) -> None:
        if self.parser is not None:
            try:
                self.parser.finalize()
            except Exception as exc:
                raise HTTPProblem(
                    400, "bad_request", f"malformed multipart body ({first_line(exc, with_type=True)})"
                ) from None
        self.fh.close()

    def discard(self) -> None:
        try:
            self.fh.close()
        finally:
            Path(self.path).unlink(missing_ok=True)


@dataclass
class _Upload:
    """One body being received: its client address, the task receiving it, when it started and
    last got a byte (event-loop time), and the bytes so far."""

    client: str
    task: asyncio.Task | None
    start: float
    last: float
    bytes: int = 0
    evicted: bool = False
    why: str = ""

    def rate(self, now: float) -> float:
        return self.bytes / max(now - self.start, 1e-3)


class Uploads:
    """The upload places (see the module doc's fairness paragraph). Used on the event loop
    only, so it needs no lock."""

    def __init__(
        self, max_total: int, max_per_client: int, idle_evict_s: float, min_rate: float = 0.0, retry_after_s: int = 1
    ):
        self.max_total, self.max_per_client, self.idle_evict_s = max_total, max_per_client, idle_evict_s
        self.min_rate, self.retry_after_s = min_rate, retry_after_s
        self.active: list[_Upload] = []
        self.evictions = 0

    def admit(self, client: str, now: float) -> _Upload:
        """A place for a new upload from ``client``; when its client's (or the server's) places
        are all taken, the slowest upload that is idle (nothing for ``idle_evict_s``) or too slow
        (under ``min_rate`` bytes/s on average, after ``idle_evict_s``) gives its place up;
        HTTPProblem 429 / 503 when none is."""
        mine = [u for u in self.active if u.client == client]
        if len(mine) >= self.max_per_client:
            pool, status, kind = mine, 429, "too_many_uploads"
            why = f"{len(mine)} uploads from {client} in progress, none idle"
        elif len(self.active) >= self.max_total:
            pool, status, kind = self.active, 503, "busy"
            why = f"{len(self.active)} uploads in progress, none idle"
        else:
            pool = None
        if pool is not None:
            idle = [
                u
                for u in pool
                if now - u.last >= self.idle_evict_s
                or (now - u.start >= self.idle_evict_s and u.rate(now) < self.min_rate)
            ]
            if not idle:
                raise HTTPProblem(
                    status,
                    kind,
                    f"server busy ({why}); retry after {self.retry_after_s} s",
                    {"Retry-After": str(self.retry_after_s)},
                )
            victim = min(idle, key=lambda u: (u.rate(now), u.last))
            victim.evicted = True
            victim.why = f"sent {victim.bytes} bytes in {now - victim.start:.1f} s (nothing for the last {now - victim.last:.1f} s)"
            self.active.remove(victim)
            self.evictions += 1
            if victim.task is not None:
                victim.task.cancel()  # receive_body turns it into 408 for that client
        u = _Upload(client, asyncio.current_task(), now, now)
        self.active.append(u)
        return u

    def release(self, u: _Upload) -> None:
        if u in self.active:
            self.active.remove(u)


async def receive_body(request, cfg: ServeConfig, directory: str | None = None, upload: _Upload | None = None) -> _Sink:
    """Stream the request body into a spool file in ``directory`` with the size limit and
    timeouts; ``upload``: its place in ``Uploads``, kept fresh (an eviction ends the upload
    with 408; the caller releases the place)."""
    media = _media_type(request.headers.get("content-type"))
    if media != "multipart/form-data":
        _check_type(media, "request body")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cfg.max_bytes:
        raise HTTPProblem(413, "too_large", f"upload of {int(declared)} bytes is over the {cfg.max_bytes}-byte limit")
    from starlette.requests import ClientDisconnect

    sink = _Sink(media, directory)
    loop = asyncio.get_running_loop()
    try:
        if sink.multipart:
            sink.start_multipart(request.headers.get("content-type", ""))
        deadline = loop.time() + cfg.body_timeout_s
        total = 0
        stream = request.stream().__aiter__()
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise HTTPProblem(
                    408,
                    "timeout",
                    f"the upload took longer than the {cfg.body_timeout_s:g} s limit for a whole body "
                    f"({total} bytes received; it was still sending)",
                )
            stall = cfg.chunk_timeout_s <= left  # which limit ends the wait, if one does
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), min(left, cfg.chunk_timeout_s))
            except StopAsyncIteration:
                break
            except ClientDisconnect:
                raise HTTPProblem(
                    400, "disconnected", f"the client closed the connection after {total} bytes of the body"
                ) from None
            except asyncio.TimeoutError:
                if stall:
                    raise HTTPProblem(
                        408,
                        "timeout",
                        f"the upload stalled: no data for {cfg.chunk_timeout_s:g} s (after {total} bytes)",
                    ) from None
                raise HTTPProblem(
                    408,
                    "timeout",
                    f"the upload took longer than the {cfg.body_timeout_s:g} s limit for a whole body "
                    f"({total} bytes received; it was still sending)",
                ) from None
            if upload is not None:
                upload.last = loop.time()
                upload.bytes += len(chunk)
            total += len(chunk)
            if total > cfg.max_bytes:
                raise HTTPProblem(413, "too_large", f"upload is over the {cfg.max_bytes}-byte limit")
            if chunk:
                sink.feed(chunk)
        sink.finish()
        if sink.multipart and sink.part_type:
            _check_type(sink.part_type, "uploaded file")
        if sink.bytes == 0:
            raise HTTPProblem(
                400, "empty", "empty upload: send the audio file as the request body or as a multipart file"
            )
        return sink
    except asyncio.CancelledError:
        sink.discard()
        if upload is None or not upload.evicted:
            raise
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        raise HTTPProblem(
            408,
            "timeout",
            f"the upload {upload.why}, too slow while other uploads waited for its place; send the body at once",
        ) from None
    except BaseException:
        sink.discard()
        raise


# ---------------------------------------------------------------------------------------------
# bounded work: decoded windows held, spool directory, memory


class WindowBudget:
    """At most ``limit`` decoded windows held by all requests together: a request takes its
    share before it decodes and gives it back when answered (waiting, in arrival order, while
    the others hold the rest)."""

    def __init__(self, limit: int):
        self.limit, self.used = int(limit), 0
        self._cond: asyncio.Condition | None = None

    async def acquire(self, n: int) -> int:
        n = max(1, min(int(n), self.limit))
        if self._cond is None:
            self._cond = asyncio.Condition()
        async with self._cond:
            await self._cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
        return n

    async def release(self, n: int) -> None:
        async with self._cond:
            self.used -= n
            self._cond.notify_all()


class SpoolDir:
    """The server's own directory of upload spool files: ``<root>/<pid>-XXXX/``, locked (flock)
    while the server runs. At start every sibling whose lock is free (its server died, even by
    kill -9 or the OOM killer) is removed with what it holds; at exit, its own."""

    def __init__(self, root: str | os.PathLike | None = None):
        base = Path(root) if root else Path(tempfile.gettempdir()) / f"embedkit-serve-{os.getuid()}"
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = base.lstat()
        import stat

        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise EmbedkitError(f"spool directory {base} is not a directory owned by this user; pass --spool-dir")
        self.root = base
        self.removed = self._clean()
        self.path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))
        self._lock = _lock(self.path / ".lock", wait=True)

    def _clean(self) -> list[str]:
        # Only directories this class made (<pid>-XXXX holding .lock), whose lock is free and
        # whose process is gone: never anything else a --spool-dir may hold, and never a
        # directory of a server that is starting (it holds its lock from the start).
        removed = []
        for d in sorted(self.root.iterdir()):
            pid = d.name.split("-", 1)[0]
            if not (pid.isdigit() and "-" in d.name) or d.is_symlink() or not (d / ".lock").is_file():
                continue
            # a directory of this process (another app of it) is told apart by its lock below
            if int(pid) != os.getpid() and alive(int(pid)):
                continue
            fh = _lock(d / ".lock", wait=False)
            if fh is None:
                continue  # a running server's
            try:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d.name)
            finally:
                fh.close()
        return removed

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _lock(path: Path, wait: bool):
    """An open file holding an exclusive flock on ``path`` (created), or None when another
    process (or another open of it) holds it. Without fcntl (Windows): always the lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return open(path, "a")
    try:
        fh = open(path, "a")
    except OSError:
        return None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        fh.close()
        return None
    return fh


def release_memory() -> None:
    """Hand freed heap pages back to the system (glibc ``malloc_trim``; elsewhere nothing).
    Without it, the arenas of the decode threads keep the peak of a large request for good."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def windows_for(seconds: float, sample_rate: int, segment_s: float, hop_s: float) -> int:
    """Windows the one windowing function cuts from ``seconds`` of audio."""
    from ..audio.segments import window_starts

    return len(window_starts(int(round(seconds * sample_rate)), sample_rate, segment_s, hop_s))


def plan_windows(tagger, ex, cfg: ServeConfig) -> int | None:
    """Windows ``ex`` listens to (an upper bound), refused with 422 beyond the configured
    limits; None for ``full`` (known once the header is read: ``read_bounded``)."""
    clip_s, seg = tagger.audio.clip_s, tagger.segment
    if ex.mode == "full" or clip_s is None:
        return None
    clips = ex.n if ex.mode == "spread" else 1
    n = clips * windows_for(clip_s, tagger.sample_rate, seg.segment_s, seg.hop_s)
    if n > cfg.max_windows or clips * clip_s > cfg.max_audio_s:
        most = max(1, min(cfg.max_windows // max(1, n // clips), int(cfg.max_audio_s // clip_s)))
        raise HTTPProblem(
            422,
            "over_limit",
            f"excerpt {ex} listens to {clips * clip_s:g} s in {n} windows, over this server's limits "
            f"({cfg.max_windows} windows, {cfg.max_audio_s:g} s of audio); use at most spread:{most}",
        )
    return n


def read_bounded(path: str, tagger, ex, cfg: ServeConfig):
    """``read_excerpt`` within the limits: the header's rate, channels and (for ``full``)
    length are checked first; ``full`` decodes at most ``max_audio_s`` (+ one second to see
    that a file is longer than its header says). -> (windows, starts, duration_s)."""
    from ..audio import decoding as audio
    from ..audio.excerpts import TooLong, read_excerpt

    info = audio.probe(path)
    sr, channels = int(info["sample_rate"]), int(info["channels"])
    if not RATE_RANGE[0] <= sr <= RATE_RANGE[1]:
        raise AudioError(path, f"sample rate {sr} Hz is outside {RATE_RANGE[0]}..{RATE_RANGE[1]} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(path, f"{channels} channels (1..{MAX_CHANNELS} accepted)")
    seg, clip_s = tagger.segment, tagger.audio.clip_s
    full = ex.mode == "full" or clip_s is None
    if full and info["duration_s"] > cfg.max_audio_s:
        raise HTTPProblem(
            413,
            "too_long",
            f"excerpt=full on {info['duration_s']:.0f} s of audio, over this server's {cfg.max_audio_s:g} s limit; "
            "use excerpt=first, middle or spread:N",
        )
    try:
        windows, starts, duration = read_excerpt(
            path,
            tagger.sample_rate,
            ex,
            clip_s,
            seg.segment_s,
            seg.hop_s,
            max_full_s=cfg.max_audio_s,
            duration_s=float(info["duration_s"]),
        )
    except TooLong:
        raise HTTPProblem(
            413,
            "too_long",
            f"excerpt=full on more than {cfg.max_audio_s:g} s of audio (the header said {info['duration_s']:.0f} s), "
            "over this server's limit; use excerpt=first, middle or spread:N",
        ) from None
    if full and len(windows) > cfg.max_windows:
        raise HTTPProblem(
            413, "too_long", f"excerpt=full gives {len(windows)} windows, over this server's {cfg.max_windows}"
        )
    return windows, starts, duration


# ---------------------------------------------------------------------------------------------
# the app


# ---------------------------------------------------------------------------------------------
# who may ask: Host, Origin, token

#: paths answered without the token: the page (it asks for the token) and liveness
OPEN_PATHS = ("/", "/healthz")
#: metric labels of the service's own paths; anything else is counted as "other"
KNOWN_PATHS = ("/v1/tag", "/v1/model", "/healthz", "/metrics", "/", "/docs", "/openapi.json")


def endpoint_label(path: str) -> str:
    return path if path in KNOWN_PATHS else "other"


def host_name(host: str) -> str:
    """The name in a Host header, lower case, without port or IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """Whether a bind address (or name) only accepts connections from this machine."""
    h = host_name(host) if host.startswith("[") else host.strip().lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def check_request(cfg: ServeConfig, path: str, headers: dict[str, str]) -> HTTPProblem | None:
    """The refusal of a request by its Host, Origin and token (see the module doc), or None."""
    host = headers.get("host")
    if host is not None and "*" not in cfg.allowed_hosts and host_name(host) not in cfg.allowed_hosts:
        return HTTPProblem(
            421,
            "bad_host",
            f"Host {host[:100]!r} is not one this server answers to ({', '.join(cfg.allowed_hosts)}); "
            "start it with --allow-host NAME to add one",
        )
    origin = headers.get("origin")
    if origin is not None:
        o = origin.strip().lower().rstrip("/")
        own = host is not None and o in (f"http://{host.lower()}", f"https://{host.lower()}")
        if not (own or "*" in cfg.allowed_origins or o in cfg.allowed_origins):
            return HTTPProblem(
                403,
                "forbidden_origin",
                f"requests from the page at {origin[:100]!r} are refused (cross-site); "
                "start the server with --allow-origin ORIGIN to allow that site",
            )
    if cfg.token is not None and path not in OPEN_PATHS:
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), cfg.token.encode()):
            return HTTPProblem(
                401,
                "unauthorized",
                "this server needs a token: send the header Authorization: Bearer TOKEN",
                {"WWW-Authenticate": "Bearer"},
            )
    return None


class Guard:
    """ASGI middleware: ``check_request`` before any route runs (no body is read from a
    refused request). ``answer(problem, path)`` makes the JSON response."""

    def __init__(self, app, cfg: ServeConfig, answer):
        self.app, self.cfg, self.answer = app, cfg, answer

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            refused = check_request(self.cfg, scope["path"], headers)
            if refused is not None:
                await self.answer(refused, scope["path"])(scope, receive, send)
                return
        await self.app(scope, receive, send)


def server_rule(tagger, cfg: ServeConfig):
    """The rule a request gets without overrides: the model's, with ``serve --threshold``."""
    from .records import applied_rule

    return applied_rule(
        tagger, cfg.threshold, cfg.multi, cfg.multi_threshold, cfg.margin, cfg.max_genres, cfg.not_music
    )


def model_info(tagger, cfg: ServeConfig) -> dict[str, Any]:
    from dataclasses import asdict

    meta = {
        k: v for k, v in (tagger.meta or {}).items() if isinstance(v, (str, int, float, bool, list, dict)) or v is None
    }
    return {
        "model_id": tagger.model_id,
        "kind": tagger.kind,
        "labels": list(tagger.labels),
        "sample_rate": tagger.sample_rate,
        "window_samples": tagger.window_samples,
        "segment": asdict(tagger.segment),
        "audio": asdict(tagger.audio),
        "spec": tagger.spec,
        "threshold": server_rule(tagger, cfg).threshold,
        "rule": server_rule(tagger, cfg).to_dict(),
        "calibrated": tagger.calibration is not None,
        "runtime": meta.get("runtime", "torch"),
        "excerpt": cfg.excerpt,
        "metadata": meta,
        "limits": {
            "max_bytes": cfg.max_bytes,
            "max_audio_s": cfg.max_audio_s,
            "max_windows": cfg.max_windows,
            "body_timeout_s": cfg.body_timeout_s,
            "chunk_timeout_s": cfg.chunk_timeout_s,
            "max_pending": cfg.max_pending,
            "max_uploads": cfg.max_uploads,
            "max_uploads_per_client": cfg.max_uploads_per_client,
        },
        "auth": "bearer" if cfg.token else None,
        "batching": {"wait_ms": cfg.batch_wait_ms, "max_batch_windows": cfg.max_batch_windows},
    }


def create_app(tagger, cfg: ServeConfig | None = None):
    """The FastAPI app serving ``tagger`` (any embedkit Tagger, OnnxTagger included)."""
    _require_serve()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ..audio.excerpts import Excerpt
    from .records import track_result

    cfg = cfg or ServeConfig()
    try:
        plan_windows(tagger, Excerpt.parse(cfg.excerpt), cfg)
    except HTTPProblem as exc:
        raise EmbedkitError(f"--excerpt {cfg.excerpt}: {exc.message}") from None
    default_rule = server_rule(tagger, cfg)
    metrics = Metrics()
    decode_pool = ThreadPoolExecutor(max(1, cfg.decode_workers), thread_name_prefix="embedkit-decode")
    state: dict[str, Any] = {"pending": 0, "started": time.time()}
    lock = threading.Lock()
    spool = SpoolDir(cfg.spool_dir)
    uploads = Uploads(
        cfg.max_uploads, cfg.max_uploads_per_client, cfg.idle_evict_s, cfg.min_upload_rate, cfg.retry_after_s
    )
    budget = WindowBudget(cfg.max_held_windows)
    database = None
    if cfg.db:
        from .resultsdb import ResultsDB

        database = ResultsDB(cfg.db)
        database.register_model(
            tagger.model_id,
            tagger.kind,
            tagger.labels,
            str(tagger.meta.get("artefact", tagger.meta.get("model_path", ""))),
            tagger.meta.get("run_id"),
        )

    @asynccontextmanager
    async def lifespan(app):
        app.state.batcher = Batcher(tagger, metrics, cfg.batch_wait_ms, cfg.max_batch_windows)
        app.state.batcher.start()
        try:
            yield
        finally:
            await app.state.batcher.stop()
            decode_pool.shutdown(wait=False, cancel_futures=True)
            spool.close()
            if database is not None:
                database.close()

    app = FastAPI(
        title="embedkit tagging service",
        version=__import__("embedkit").__version__,
        lifespan=lifespan,
        description="Music genre tagging of audio uploads with an embedkit model.",
    )
    app.state.metrics, app.state.config, app.state.tagger = metrics, cfg, tagger
    app.state.uploads, app.state.budget, app.state.spool = uploads, budget, spool

    def problem(status: int, kind: str, message: str, headers: dict | None = None, endpoint: str = "/v1/tag"):
        metrics.errors.labels(kind).inc()
        metrics.requests.labels(endpoint_label(endpoint), str(status)).inc()
        message = " ".join(str(message).split())[:500]
        return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=status, headers=headers)

    app.add_middleware(
        Guard, cfg=cfg, answer=lambda exc, path: problem(exc.status, exc.kind, exc.message, exc.headers, path)
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "query")
        return problem(400, "bad_request", f"{where}: {first.get('msg', 'invalid value')}", endpoint=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        # Starlette's own answers (no such path, wrong method) in the service's one error format
        path, method = request.url.path[:100], request.method
        if exc.status_code == 404:
            kind = "not_found"
            message = f"no such path: {method} {path}; this service has POST /v1/tag, GET /v1/model, /healthz, /metrics, /docs and /"
        elif exc.status_code == 405:
            kind = "method_not_allowed"
            message = f"{method} is not allowed on {path}; use {(exc.headers or {}).get('Allow', 'another method')}"
        else:
            kind, message = "http_error", str(exc.detail)
        return problem(exc.status_code, kind, message, dict(exc.headers or {}), endpoint=path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        message = f"internal error: {first_line(exc, 200, with_type=True)}"
        return problem(500, "internal", message, endpoint=request.url.path)

    @app.post("/v1/tag", summary="Tag one audio file (multipart upload or raw body)")
    async def tag_endpoint(
        request: Request,
        excerpt: str = Query(cfg.excerpt, description="first | middle | spread:N | full"),
        threshold: float | None = Query(
            None,
            ge=0.0,
            le=1.0,
            description="decision is 'uncertain' below this top probability (default: the model's)",
        ),
        top_k: int = Query(cfg.top_k, ge=1, le=1000, description="most probable genres listed (topk)"),
        multi: bool | None = Query(
            None, description="several genres: those at or above multi_threshold or within margin of the top one"
        ),
        multi_threshold: float | None = Query(
            None, ge=0.0, le=1.0, description="with multi: keep genres at or above this"
        ),
        margin: float | None = Query(
            None, ge=0.0, le=1.0, description="with multi: keep genres within this of the top one"
        ),
        max_genres: int | None = Query(None, ge=1, le=1000, description="with multi: at most this many genres"),
        not_music: float | None = Query(
            None, ge=0.0, description="decision is 'not-music' at or above this not-music score (default: the model's)"
        ),
    ):
        t0 = time.perf_counter()
        try:
            ex = Excerpt.parse(excerpt)
            rule = default_rule.with_overrides(threshold, multi, multi_threshold, margin, max_genres, not_music)
        except EmbedkitError as exc:
            return problem(400, "bad_request", str(exc).replace("--excerpt", "excerpt"))
        loop = asyncio.get_running_loop()
        sink, upload, pending, held = None, None, False, 0
        try:
            planned = plan_windows(tagger, ex, cfg)  # spread:100000 is refused before its body is read
            upload = uploads.admit(request.client.host if request.client else "?", loop.time())
            try:
                sink = await receive_body(request, cfg, str(spool.path), upload)
            finally:
                uploads.release(upload)
            t_upload = time.perf_counter()
            with lock:  # a complete body: now it is work, counted against max_pending
                pending = state["pending"] < cfg.max_pending
                if pending:
                    state["pending"] += 1
                    metrics.pending.set(state["pending"])
            if not pending:
                raise HTTPProblem(
                    503,
                    "busy",
                    f"server busy ({cfg.max_pending} requests in progress); retry after {cfg.retry_after_s} s",
                    {"Retry-After": str(cfg.retry_after_s)},
                )
            await loop.run_in_executor(decode_pool, _sniff, sink.path)
            held = await budget.acquire(planned or cfg.max_windows)
            try:
                windows, starts, duration = await loop.run_in_executor(
                    decode_pool, read_bounded, sink.path, tagger, ex, cfg
                )
            except AudioError as exc:
                raise HTTPProblem(422, "not_audio", f"{sink.filename or 'upload'}: {exc.problem}") from None
            t_decode = time.perf_counter()
            metrics.decode.observe(t_decode - t_upload)
            p_windows, queue_s, model_s, not_music = await request.app.state.batcher.submit(windows)
            del windows
            result = track_result(
                tagger,
                p_windows,
                rule,
                path=f"upload:{sink.filename or 'body'}",
                excerpt=str(ex),
                top_k=top_k,
                duration_s=duration,
                window_starts_s=starts,
                not_music=not_music,
            )
            metrics.tagged.inc()
            if result.uncertain:
                metrics.uncertain.inc()
            metrics.decisions.observe(result)
            if database is not None:
                await loop.run_in_executor(decode_pool, _store, database, sink, result)
            body = {
                **result.to_json(),
                "threshold": rule.threshold,
                "filename": sink.filename,
                "timings_ms": {
                    "upload": 1e3 * (t_upload - t0),
                    "decode": 1e3 * (t_decode - t_upload),
                    "queue": 1e3 * queue_s,
                    "inference": 1e3 * model_s,
                    "total": 1e3 * (time.perf_counter() - t0),
                },
            }
            metrics.latency.observe(time.perf_counter() - t0)
            metrics.requests.labels("/v1/tag", "200").inc()
            return JSONResponse(body)
        except HTTPProblem as exc:
            return problem(exc.status, exc.kind, exc.message, exc.headers)
        finally:
            if sink is not None:
                sink.discard()
            if held:
                await budget.release(held)
                if held > cfg.max_batch_windows:  # a large request: give its peak back to the system
                    loop.run_in_executor(decode_pool, release_memory)
            if pending:
                with lock:
                    state["pending"] -= 1
                    metrics.pending.set(state["pending"])

    @app.get("/v1/model", summary="The model: labels, spec, thresholds, metadata")
    async def model_endpoint():
        metrics.requests.labels("/v1/model", "200").inc()
        return model_info(tagger, cfg)

    @app.get("/healthz", summary="Liveness")
    async def healthz():
        return {
            "status": "ok",
            "model_id": tagger.model_id,
            "uptime_s": time.time() - state["started"],
            "pending": state["pending"],
        }

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics_endpoint():
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    @app.get("/", response_class=HTMLResponse, summary="Upload page")
    async def page():
        from .serve_page import page as render_page

        return HTMLResponse(render_page(similar=bool(cfg.db)))

    if cfg.db:  # similar tracks of the library in the database (embedkit.deploy.similar_http)
        from .similar_http import add_routes

        app.state.similar = add_routes(
            app, tagger, cfg, problem, uploads, str(spool.path), receive_body, _sniff, HTTPProblem
        )
    return app


def _store(database, sink: _Sink, result) -> None:
    """Write one answer into the results database: the row ``embedkit tag`` writes for the same
    audio and rule (keyed on the upload's content fingerprint)."""
    from dataclasses import replace

    from ..identity import FileStat, fingerprint

    stat = FileStat.of(sink.path)
    fp = fingerprint(sink.path, scheme=database.scheme)
    database.write([replace(result, fingerprint=fp, size=stat.size, mtime_ns=stat.mtime_ns, inode=stat.inode).db_row()])


def load_model(
    model: str | os.PathLike, checkpoint: str | None = None, device: str | None = None, allow_tf32: bool = False
):
    """A run directory / model file / exported .onnx -> a Tagger on ``device`` (embedkit.device;
    None: the CPU; ignored for .onnx models, which run on onnxruntime)."""
    from .tagger import load_tagger

    return load_tagger(model, checkpoint=checkpoint, device=device, allow_tf32=allow_tf32)


def bind_config(host: str, cfg: ServeConfig, insecure_no_token: bool = False) -> ServeConfig:
    """``cfg`` for a server listening on ``host``: the bind address joins the allowed Host names
    (a wildcard address, 0.0.0.0 or ::, cannot name the server: then any Host is allowed, the
    token guarding the door). Refuses (EmbedkitError) a non-loopback ``host`` without a token,
    unless ``insecure_no_token``: anyone who can reach the port could then tag audio and fill
    ``--db``."""
    from dataclasses import replace

    if not is_loopback(host) and cfg.token is None and not insecure_no_token:
        raise EmbedkitError(
            f"--host {host} accepts connections from other machines: pass --token (or set {TOKEN_ENV}) so only "
            "clients sending Authorization: Bearer TOKEN are answered, or --insecure-no-token to serve anyone"
        )
    name = host_name(host) if host.startswith("[") else host.strip().lower()
    hosts = list(cfg.allowed_hosts)
    if name in ("0.0.0.0", "::", ""):
        hosts.append("*")
    elif name not in hosts:
        hosts.append(name)
    return replace(cfg, allowed_hosts=tuple(hosts))


def serve(
    model: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    cfg: ServeConfig | None = None,
    checkpoint: str | None = None,
    log_level: str = "info",
    device: str | None = None,
    allow_tf32: bool = False,
    insecure_no_token: bool = False,
) -> None:
    """Load ``model`` once (on ``device``) and serve it with uvicorn until interrupted.
    A non-loopback ``host`` needs ``cfg.token`` unless ``insecure_no_token`` (see ``bind_config``)."""
    _require_serve()
    import uvicorn

    cfg = bind_config(host, cfg or ServeConfig(), insecure_no_token)
    app = create_app(load_model(model, checkpoint, device, allow_tf32), cfg)
    uvicorn.run(app, host=host, port=int(port), log_level=log_level, timeout_keep_alive=5, limit_concurrency=None)
