"""``embedkit serve --db``: similar tracks over HTTP, the same library call and rules as the CLI.

- ``GET /v1/similar?track=PATH_OR_FINGERPRINT&k=10`` — a track of the library;
- ``POST /v1/similar?k=10`` — an uploaded audio file (multipart or raw body, the limits of
  ``POST /v1/tag``), embedded with the served model (the library's own: a database whose vectors
  are another model's is refused);

rules as query parameters named as the CLI's options: ``max_per_artist``,
``exclude_same_album``, ``genre``, ``min_confidence``, ``keep_duplicates``. The answer is
``SimilarResult.to_json()``: the query, ``results`` (path, score, artist, album, title,
decision, confidence), ``duplicates`` (the query's near-duplicates). The library and its
index are opened once and brought up to date before each answer (tracks tagged since appear).
"""

from __future__ import annotations

import threading
from typing import Any

# at module level: FastAPI reads the endpoints' (postponed) annotations from these globals; this
# module is imported by ``serve.create_app`` only, once FastAPI is known to be installed
from fastapi import Depends, Query, Request

from .similar import Index, Library, Rules, SimilarError, similar


def rules_query(
    max_per_artist: int | None = Query(None, ge=1, description="at most N results per artist"),
    exclude_same_album: bool = Query(False, description="no results from the query's album"),
    genre: str | None = Query(None, description="only tracks decided as this genre"),
    min_confidence: float | None = Query(None, ge=0.0, le=1.0, description="decided probability at least this"),
    keep_duplicates: bool = Query(False, description="list near-duplicates of the query among the results"),
) -> Rules:
    """The rules of both /v1/similar endpoints, from the query string (the CLI's options)."""
    return Rules(max_per_artist, exclude_same_album, genre, min_confidence, "keep" if keep_duplicates else "collapse")


class _Shared:
    """The served library and its index, opened on first use, updated before each request."""

    def __init__(self, db: str, tagger, max_audio_s: float | None = None):
        self.db, self.tagger, self.max_audio_s = db, tagger, max_audio_s
        self.lock = threading.Lock()
        self.lib: Library | None = None
        self.idx: Index | None = None

    def answer(self, query: str, k: int, rules: Rules) -> dict[str, Any]:
        with self.lock:  # index updates mutate it; answers are milliseconds
            if self.lib is None:
                self.lib = Library(self.db, self.tagger.model_id)
            if self.idx is None:
                self.idx = Index.open(self.lib)
            else:
                self.idx.update(self.lib)
            return similar(
                self.db,
                query,
                k,
                rules,
                tagger=self.tagger,
                library=self.lib,
                index=self.idx,
                max_audio_s=self.max_audio_s,  # an upload is bounded as /v1/tag's are
            ).to_json()

    def close(self) -> None:
        if self.lib is not None:
            self.lib.close()


def add_routes(app, tagger, cfg, problem, uploads, spool_path: str, receive_body, sniff, http_problem) -> _Shared:
    """Register GET / POST ``/v1/similar`` on the FastAPI ``app`` of ``serve.create_app``, which
    hands over its own upload machinery (``uploads``, the spool folder, ``receive_body``,
    ``sniff``, its ``HTTPProblem`` class) and error answer (``problem``)."""
    import asyncio

    from fastapi.responses import JSONResponse

    shared = _Shared(cfg.db, tagger, cfg.max_audio_s)

    async def run(query: str, k: int, rules: Rules, endpoint: str, filename: str | None = None):
        loop = asyncio.get_running_loop()
        try:
            body = await loop.run_in_executor(None, shared.answer, query, k, rules)
        except SimilarError as exc:
            status, kind = exc.status, exc.kind
            msg = str(exc).replace(query, f"upload:{filename or 'body'}") if filename is not None else str(exc)
            return problem(status, kind, msg, endpoint=endpoint)
        if filename is not None:  # the spool file's name means nothing to the client
            body["query"]["path"] = f"upload:{filename or 'body'}"
        return JSONResponse(body)

    @app.get("/v1/similar", summary="Tracks of the library similar to one of its tracks")
    async def similar_get(
        track: str = Query(..., description="a library track: its path or fingerprint"),
        k: int = Query(10, ge=1, le=1000, description="number of results"),
        rules: Rules = Depends(rules_query),
    ):
        return await run(track, k, rules, "/v1/similar")

    @app.post("/v1/similar", summary="Tracks of the library similar to an uploaded audio file")
    async def similar_post(
        request: Request,
        k: int = Query(10, ge=1, le=1000, description="number of results"),
        rules: Rules = Depends(rules_query),
    ):
        loop = asyncio.get_running_loop()
        sink = upload = None
        try:
            upload = uploads.admit(request.client.host if request.client else "?", loop.time())
            try:
                sink = await receive_body(request, cfg, spool_path, upload)
            finally:
                uploads.release(upload)
            await loop.run_in_executor(None, sniff, sink.path)
            return await run(sink.path, k, rules, "/v1/similar", sink.filename or "")
        except http_problem as exc:
            return problem(exc.status, exc.kind, exc.message, exc.headers, endpoint="/v1/similar")
        finally:
            if sink is not None:
                sink.discard()

    return shared
