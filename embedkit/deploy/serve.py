"""HTTP tagging service: ``embedkit serve RUN_OR_ONNX [--host 127.0.0.1 --port 8000]``.

Endpoints (FastAPI; OpenAPI docs at /docs and /openapi.json):

- ``POST /v1/tag``: an audio file as a multipart upload (any field name; the first part with a
  file name, else the first part) or as the raw request body. Query options: ``excerpt``
  (first | middle | spread:N | full, as ``embedkit tag``), ``top_k``, and the decision rule's
  overrides with ``embedkit tag``'s names and meanings: ``threshold``, ``multi``,
  ``multi_threshold``, ``margin``, ``max_genres`` (``embedkit.calibration.DecisionRule``).
  Answer: the track's record (``embedkit.deploy.records.TrackResult.to_json``: decision, genres
  decided, topk, probabilities, the rule applied, model id, what was listened to), the file
  name and timings (ms).
- ``GET /v1/model``: labels, kind, spec, window / clip contract, the default rule, metadata.
- ``GET /healthz``; ``GET /metrics`` (Prometheus text format); ``GET /``: a page for people.

How a request runs. The body is streamed to a temporary file (never held in memory), with a
size limit (413, checked against Content-Length first and while streaming) and a body timeout
(408: a client that stops sending, or sends too slowly, cannot hold a worker). Decoding runs in
a thread pool off the event loop and decodes only the excerpt (``embedkit.audio.excerpts.read_excerpt``,
the same code as ``embedkit tag``), so a 3-hour upload costs its 30 s excerpt. The model is
loaded once and shared.

Batching policy: one inference thread runs the model. Requests whose windows are ready while
it is busy, or within ``batch_wait_ms`` (default 5 ms) of the first, are run as one forward
of up to ``max_batch_windows`` windows (default 64); a request is never split. Admission: at
most ``max_pending`` requests (default 32) are in the service at once (uploading, decoding,
waiting or running); one more gets 503 with ``Retry-After`` at once, so memory stays bounded
and clients back off instead of timing out.

Errors are JSON ``{"error": {"kind", "message"}}`` with one-line messages: 400 bad option or
empty body, 408 body too slow, 413 too large, 415 unsupported format, 422 not decodable /
truncated / silent / too short audio, 503 busy, 500 anything unforeseen (the server keeps
serving). ``--db`` writes every result into the results database of ``embedkit tag``.
"""

# no `from __future__ import annotations`: FastAPI resolves the endpoint annotations at runtime

import asyncio
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AudioError, EmbedkitError, first_line

SERVE_INSTALL = "pip install 'embedkit[serve]'"
#: Content-Types accepted for a raw body or an upload part (besides audio/*)
GENERIC_TYPES = ("application/octet-stream", "binary/octet-stream", "")
#: leading bytes of formats libsndfile cannot decode (answered 415, not 422)
UNSUPPORTED_MAGIC = {
    b"ftyp": "MP4/M4A/AAC",  # at offset 4
    b"\x1aE\xdf\xa3": "Matroska/WebM",
    b"%PDF": "PDF",
    b"\x89PNG": "PNG image",
    b"\xff\xd8\xff": "JPEG image",
    b"PK\x03\x04": "ZIP archive",
    b"GIF8": "GIF image",
    b"<!DO": "HTML",
    b"<htm": "HTML",
    b"{": "JSON",
}


@dataclass
class ServeConfig:
    """Limits and policy of the service (CLI flags of ``embedkit serve``)."""

    max_bytes: int = 100 * 1024 * 1024  # 413 above
    body_timeout_s: float = 30.0  # 408 when the whole body takes longer
    chunk_timeout_s: float = 10.0  # 408 when no byte arrives for this long
    max_pending: int = 32  # 503 + Retry-After above
    batch_wait_ms: float = 5.0
    max_batch_windows: int = 64
    decode_workers: int = 2
    excerpt: str = "first"
    top_k: int = 3
    # the server's decision rule: the model's with these overrides (None keeps the model's);
    # a request's query parameters of the same names override it again
    threshold: float | None = None
    multi: bool | None = None
    multi_threshold: float | None = None
    margin: float | None = None
    max_genres: int | None = None
    retry_after_s: int = 1
    db: str | None = None


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
    """Runs ``tagger.predict_segments`` on one thread, joining concurrent requests (see the
    module doc for the policy). ``submit(windows)`` -> (probabilities [K, C], queue s, model s)."""

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
                p = await loop.run_in_executor(self.pool, self.tagger.predict_segments, x)
            except Exception as exc:  # noqa: BLE001 - answered per request, the loop keeps going
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            model_s = time.perf_counter() - t0
            self.metrics.inference.observe(model_s)
            self.metrics.batch.observe(len(jobs))
            at = 0
            for j in jobs:
                k = len(j.windows)
                if not j.future.done():
                    j.future.set_result((p[at : at + k], t0 - j.queued, model_s))
                at += k


# ---------------------------------------------------------------------------------------------
# request bodies


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _check_type(media: str, where: str) -> None:
    if media.startswith("audio/") or media in GENERIC_TYPES or media == "video/ogg":
        return
    raise HTTPProblem(
        415,
        "unsupported_media_type",
        f"{where}: Content-Type {media!r} is not audio; send an audio file (WAV, FLAC, OGG, MP3, AIFF) as audio/* or application/octet-stream",
    )


def _sniff(path: str) -> None:
    with open(path, "rb") as fh:
        head = fh.read(12)
    if head[4:8] == b"ftyp":
        raise HTTPProblem(
            415,
            "unsupported_media_type",
            "upload is MP4/M4A/AAC, which this server cannot decode; send WAV, FLAC, OGG, MP3 or AIFF",
        )
    for magic, name in UNSUPPORTED_MAGIC.items():
        if magic != b"ftyp" and head.startswith(magic):
            raise HTTPProblem(
                415, "unsupported_media_type", f"upload is {name}, not audio; send WAV, FLAC, OGG, MP3 or AIFF"
            )


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


async def receive_body(request, cfg: ServeConfig, directory: str | None = None) -> _Sink:
    """Stream the request body into a temporary file with the size limit and timeouts."""
    media = _media_type(request.headers.get("content-type"))
    if media != "multipart/form-data":
        _check_type(media, "request body")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cfg.max_bytes:
        raise HTTPProblem(413, "too_large", f"upload of {int(declared)} bytes is over the {cfg.max_bytes}-byte limit")
    sink = _Sink(media, directory)
    try:
        if sink.multipart:
            sink.start_multipart(request.headers.get("content-type", ""))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.body_timeout_s
        total = 0
        stream = request.stream().__aiter__()
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise HTTPProblem(408, "timeout", f"the upload took longer than {cfg.body_timeout_s:g} s")
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), min(left, cfg.chunk_timeout_s))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise HTTPProblem(
                    408,
                    "timeout",
                    f"the upload stalled (no data for {min(left, cfg.chunk_timeout_s):g} s) or took longer than {cfg.body_timeout_s:g} s",
                ) from None
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
    except BaseException:
        sink.discard()
        raise


# ---------------------------------------------------------------------------------------------
# the app


def server_rule(tagger, cfg: ServeConfig):
    """The rule a request gets without overrides: the model's, with ``serve --threshold``."""
    from .records import applied_rule

    return applied_rule(tagger, cfg.threshold, cfg.multi, cfg.multi_threshold, cfg.margin, cfg.max_genres)


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
        "limits": {"max_bytes": cfg.max_bytes, "body_timeout_s": cfg.body_timeout_s, "max_pending": cfg.max_pending},
        "batching": {"wait_ms": cfg.batch_wait_ms, "max_batch_windows": cfg.max_batch_windows},
    }


def create_app(tagger, cfg: ServeConfig | None = None):
    """The FastAPI app serving ``tagger`` (any embedkit Tagger, OnnxTagger included)."""
    _require_serve()
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response

    from ..audio.excerpts import Excerpt, read_excerpt
    from .records import track_result

    cfg = cfg or ServeConfig()
    Excerpt.parse(cfg.excerpt)
    default_rule = server_rule(tagger, cfg)
    metrics = Metrics()
    decode_pool = ThreadPoolExecutor(max(1, cfg.decode_workers), thread_name_prefix="embedkit-decode")
    state: dict[str, Any] = {"pending": 0, "started": time.time()}
    lock = threading.Lock()
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
            if database is not None:
                database.close()

    app = FastAPI(
        title="embedkit tagging service",
        version=__import__("embedkit").__version__,
        lifespan=lifespan,
        description="Music genre tagging of audio uploads with an embedkit model.",
    )
    app.state.metrics, app.state.config, app.state.tagger = metrics, cfg, tagger

    def problem(status: int, kind: str, message: str, headers: dict | None = None, endpoint: str = "/v1/tag"):
        metrics.errors.labels(kind).inc()
        metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse({"error": {"kind": kind, "message": message}}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "query")
        return problem(400, "bad_request", f"{where}: {first.get('msg', 'invalid value')}", endpoint=request.url.path)

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
    ):
        t0 = time.perf_counter()
        try:
            ex = Excerpt.parse(excerpt)
            rule = default_rule.with_overrides(threshold, multi, multi_threshold, margin, max_genres)
        except EmbedkitError as exc:
            return problem(400, "bad_request", str(exc).replace("--excerpt", "excerpt"))
        with lock:
            if state["pending"] >= cfg.max_pending:
                busy = True
            else:
                busy = False
                state["pending"] += 1
                metrics.pending.set(state["pending"])
        if busy:
            return problem(
                503,
                "busy",
                f"server busy ({cfg.max_pending} requests in progress); retry after {cfg.retry_after_s} s",
                {"Retry-After": str(cfg.retry_after_s)},
            )
        sink = None
        try:
            sink = await receive_body(request, cfg)
            t_upload = time.perf_counter()
            await asyncio.get_running_loop().run_in_executor(decode_pool, _sniff, sink.path)
            seg, clip_s = tagger.segment, tagger.audio.clip_s
            try:
                windows, starts, duration = await asyncio.get_running_loop().run_in_executor(
                    decode_pool, read_excerpt, sink.path, tagger.sample_rate, ex, clip_s, seg.segment_s, seg.hop_s
                )
            except AudioError as exc:
                raise HTTPProblem(422, "not_audio", f"{sink.filename or 'upload'}: {exc.problem}") from None
            t_decode = time.perf_counter()
            metrics.decode.observe(t_decode - t_upload)
            p_windows, queue_s, model_s = await request.app.state.batcher.submit(windows)
            result = track_result(
                tagger,
                p_windows,
                rule,
                path=f"upload:{sink.filename or 'body'}",
                excerpt=str(ex),
                top_k=top_k,
                duration_s=duration,
                window_starts_s=starts,
            )
            metrics.tagged.inc()
            if result.uncertain:
                metrics.uncertain.inc()
            if database is not None:
                await asyncio.get_running_loop().run_in_executor(decode_pool, _store, database, sink, result)
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
        from .serve_page import PAGE

        return HTMLResponse(PAGE)

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


def serve(
    model: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    cfg: ServeConfig | None = None,
    checkpoint: str | None = None,
    log_level: str = "info",
    device: str | None = None,
    allow_tf32: bool = False,
) -> None:
    """Load ``model`` once (on ``device``) and serve it with uvicorn until interrupted."""
    _require_serve()
    import uvicorn

    app = create_app(load_model(model, checkpoint, device, allow_tf32), cfg)
    uvicorn.run(app, host=host, port=int(port), log_level=log_level, timeout_keep_alive=5, limit_concurrency=None)
