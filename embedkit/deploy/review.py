"""`embedkit review`: a local page to confirm or correct the model's genres, one track at a time.

    app = create_review_app("library.sqlite")         # FastAPI; `embedkit review` serves it

The queue (``build_queue``) mixes three sources, each marked on the page:

- ``uncertain``: tracks chosen to teach the most: the least certain decisions (margin between the
  two most probable classes), spread out so that near-duplicates do not fill the queue
  (``choose_uncertain``: uncertainty-weighted farthest-point selection, in the space of the
  track vectors ``embedkit tag`` keeps when there are some, else of the probabilities);
- ``disagree``: tracks whose own genre tag disagrees with a confident decision (``library.audit``);
- ``random``: a small uniform sample, labelled with source ``audit-sample``: an unbiased audit of
  live accuracy, never trained on (``library.retrain`` scores old and new models on it).

Labels go to the results database's ``labels`` table as they are given (one transaction each,
idempotent; one row per reviewer, so two reviewers at once never overwrite each other), keyed by
the audio's fingerprint. Skips are kept per reviewer while the server runs. A reload asks the
server for the next unlabelled track: nothing given is lost.

Who may ask: the Host header must name this server (loopback names by default), the page's
requests that change anything carry a token the page was served with (a custom header a
cross-site page cannot send), and ``/audio/<fingerprint>`` serves only the files in the queue,
found by fingerprint (no path ever comes from the request), with HTTP range requests.
"""

# (no ``from __future__ import annotations``: FastAPI reads the handlers' annotations at run time)
import html
import json
import os
import secrets
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EmbedkitError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
KINDS = ("uncertain", "disagree", "random")


def choose_uncertain(prob: np.ndarray, n: int, features: np.ndarray | None = None, pool: int = 4) -> list[int]:
    """Indices of ``n`` rows of ``prob`` [N, C] worth labelling: among the ``pool * n`` least
    certain (smallest margin between the two highest probabilities), greedily the one whose
    uncertainty times its distance to those already chosen (in ``features`` [N, D], default the
    probabilities) is largest; the first is the least certain."""
    prob = np.asarray(prob, dtype=np.float64)
    if n <= 0 or not len(prob):
        return []
    top2 = np.sort(prob, axis=1)[:, -2:] if prob.shape[1] > 1 else np.concatenate([np.zeros_like(prob), prob], 1)
    unc = 1.0 - (top2[:, 1] - top2[:, 0])
    cand = np.argsort(-unc, kind="stable")[: max(n, pool * n)]
    f = np.asarray(features if features is not None else prob, dtype=np.float64)[cand]
    u = unc[cand]
    chosen = [0]
    dist = np.linalg.norm(f - f[0], axis=1)
    while len(chosen) < min(n, len(cand)):
        score = u * dist / (dist.max() or 1.0)
        score[chosen] = -1.0
        i = int(np.argmax(score))
        chosen.append(i)
        dist = np.minimum(dist, np.linalg.norm(f - f[i], axis=1))
    return [int(cand[i]) for i in chosen]


@dataclass
class QueueItem:
    fingerprint: str
    path: str
    kind: str  # uncertain | disagree | random
    decision: str
    top: list  # [[label, p], ...] best first
    confidence: float
    tag: str | None = None  # the file's own genre tag (disagree items)
    model_id: str = ""


def build_queue(
    db: str | os.PathLike,
    model: str | None = None,
    *,
    n: int = 60,
    random_share: float = 0.1,
    seed: int = 0,
) -> tuple[str, list[str], list[QueueItem]]:
    """(model id, its labels, the queue) for ``model`` (default: the only / current model of
    ``db``): tracks nobody labelled yet, interleaved uncertain, disagree, uncertain, random."""
    from .library import _newest_by_path, _pick_model, audit, current_labels, existing_db
    from .resultsdb import ResultsDB

    if not 0 <= random_share < 1:
        raise EmbedkitError(f"--random-share must be in [0, 1), got {random_share}")
    with ResultsDB(existing_db(db)) as rdb:
        model_id, labels, _ = _pick_model(rdb, model)
        rows = rdb.rows(model_id)
        done = set(current_labels(rdb))
    rows = sorted(  # a path tagged again after an edit: its latest row
        (r for r in _newest_by_path(rows).values() if r["fingerprint"] not in done and r.get("probabilities")),
        key=lambda r: r["path"],
    )
    if not rows:
        return model_id, labels, []

    def item(r: dict[str, Any], kind: str, tag: str | None = None) -> QueueItem:
        p = r["probabilities"]
        top = sorted(((c, float(p.get(c, 0.0))) for c in labels), key=lambda x: -x[1])[:5]
        return QueueItem(
            r["fingerprint"], r["path"], kind, r["decision"], [list(t) for t in top], top[0][1], tag, model_id
        )

    rng = np.random.default_rng(seed)
    n_random = min(len(rows), max(1, round(random_share * n))) if random_share > 0 else 0
    random_idx = set(rng.choice(len(rows), n_random, replace=False).tolist()) if n_random else set()
    randoms = [item(rows[i], "random") for i in sorted(random_idx)]
    taken = {rows[i]["fingerprint"] for i in random_idx}
    by_fp = {r["fingerprint"]: r for r in rows}
    disagree = [
        item(by_fp[a["fingerprint"]], "disagree", a["tag"])
        for a in audit(db, model_id)
        if a["fingerprint"] in by_fp and a["fingerprint"] not in taken
    ][: max(1, n // 4)]
    taken |= {d.fingerprint for d in disagree}
    rest = [r for r in rows if r["fingerprint"] not in taken]
    k = max(0, n - len(randoms) - len(disagree))
    if rest and k:
        P = np.array([[float(r["probabilities"].get(c, 0.0)) for c in labels] for r in rest])
        feats = _track_vectors(db, model_id, [r["fingerprint"] for r in rest])
        uncertain = [item(rest[i], "uncertain") for i in choose_uncertain(P, k, features=feats)]
    else:
        uncertain = []
    queue: list[QueueItem] = []
    pattern = ("uncertain", "disagree", "uncertain", "random")
    pools = {"uncertain": uncertain, "disagree": disagree, "random": randoms}
    while any(pools.values()):
        for kind in pattern:
            if pools[kind]:
                queue.append(pools[kind].pop(0))
    return model_id, labels, queue


def _track_vectors(db, model_id: str, fingerprints: list[str]) -> np.ndarray | None:
    """The model's track vectors of ``fingerprints`` (``embedkit tag`` keeps them: the embedding
    the model's head reads, ``deploy.vectors``), in order; None unless every one has one (the
    queue then spreads out in probability space instead)."""
    import sqlalchemy as sa

    from .resultsdb import IN_CHUNK, ResultsDB
    from .vectors import from_bytes

    with ResultsDB(db) as rdb:
        t = getattr(rdb, "vectors", None)
        if t is None or not fingerprints:
            return None
        found: dict[str, np.ndarray] = {}
        with rdb.engine.connect() as c:
            for i in range(0, len(fingerprints), IN_CHUNK):
                chunk = fingerprints[i : i + IN_CHUNK]
                q = sa.select(t.c.fingerprint, t.c.dim, t.c.vector).where(
                    t.c.model_id == model_id, t.c.fingerprint.in_(chunk)
                )
                for fp, dim, vec in c.execute(q):
                    found[fp] = from_bytes(vec, dim)
    if len(found) < len(set(fingerprints)) or len({v.shape for v in found.values()}) != 1:
        return None
    return np.stack([found[fp] for fp in fingerprints])


class ReviewState:
    """The queue and each reviewer's skips, shared by the server's requests."""

    def __init__(self, db: str | os.PathLike, model: str | None = None, **queue_options):
        self.db = str(db)
        self.model_id, self.labels, self.queue = build_queue(db, model, **queue_options)
        self.by_fp = {q.fingerprint: q for q in self.queue}
        self.skipped: dict[str, set[str]] = {}
        self.lock = threading.Lock()

    def labelled(self) -> set[str]:
        from .library import current_labels
        from .resultsdb import ResultsDB

        with ResultsDB(self.db) as rdb:
            return set(current_labels(rdb))

    def next_item(self, reviewer: str) -> dict[str, Any]:
        done = self.labelled()
        with self.lock:
            skipped = self.skipped.get(reviewer, set())
        left = [q for q in self.queue if q.fingerprint not in done and q.fingerprint not in skipped]
        out: dict[str, Any] = {
            "remaining": len(left),
            "total": len(self.queue),
            "labelled": sum(q.fingerprint in done for q in self.queue),
            "classes": self.labels,
        }
        if left:
            q = left[0]
            out["item"] = {**asdict(q), "name": Path(q.path).name, "available": Path(q.path).is_file()}
        return out

    def answer(self, fingerprint: str, action: str, label: str | None, reviewer: str) -> dict[str, Any]:
        from .resultsdb import ResultsDB

        q = self.by_fp.get(fingerprint)
        if q is None:
            raise EmbedkitError("not a track of this review queue")
        if action == "skip":
            with self.lock:
                self.skipped.setdefault(reviewer, set()).add(fingerprint)
            return {"ok": True, "action": "skip"}
        if action == "accept":
            if q.decision == "uncertain":
                raise EmbedkitError("the model was uncertain: choose a genre instead of accepting")
            label = q.decision
        elif action != "correct":
            raise EmbedkitError(f"unknown action {action!r} (accept | correct | skip)")
        label = (label or "").strip()
        if not label:
            raise EmbedkitError("a correction needs a genre")
        row = {
            "fingerprint": q.fingerprint,
            "label": label,
            "source": "audit-sample" if q.kind == "random" else "review",
            "reviewer": reviewer,
            "path": q.path,
            "model_id": q.model_id,
            "decision": q.decision,
        }
        with ResultsDB(self.db) as rdb:
            rdb.put_labels([row])
        return {"ok": True, "action": action, "label": label}


def _host_ok(host: str | None, allowed: tuple[str, ...]) -> bool:
    if not host:
        return False
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
    return name.lower() in allowed


def create_review_app(
    db: str | os.PathLike,
    model: str | None = None,
    *,
    reviewer: str = "",
    allowed_hosts: tuple[str, ...] = LOOPBACK,
    **queue_options,
):
    """The review page's FastAPI app (see the module doc). reviewer: the default name shown."""
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    state = ReviewState(db, model, **queue_options)
    token = secrets.token_urlsafe(24)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.state.review = state

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if not _host_ok(request.headers.get("host"), allowed_hosts):
            return JSONResponse({"error": "this server answers to its own address only"}, status_code=421)
        if request.method == "POST" and request.headers.get("x-review-token") != token:
            return JSONResponse({"error": "missing or wrong review token (reload the page)"}, status_code=403)
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.get("/")
    def page():
        nonce = secrets.token_urlsafe(16)
        body = (
            PAGE.replace("__NONCE__", nonce)
            .replace("__TOKEN__", html.escape(token))
            .replace("__REVIEWER__", html.escape(reviewer))
        )
        csp = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "media-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
        )
        return HTMLResponse(body, headers={"Content-Security-Policy": csp, "Cache-Control": "no-store"})

    @app.get("/api/next")
    def next_item(reviewer: str = ""):
        return JSONResponse(state.next_item(reviewer), headers={"Cache-Control": "no-store"})

    @app.post("/api/label")
    async def label(request: Request):
        try:
            body = json.loads(await request.body())
            res = state.answer(
                str(body["fingerprint"]), str(body["action"]), body.get("label"), str(body.get("reviewer") or "")
            )
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "expected JSON {fingerprint, action, label?, reviewer}"}, status_code=400)
        except EmbedkitError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return res

    @app.get("/audio/{fingerprint}")
    def audio(fingerprint: str):
        q = state.by_fp.get(fingerprint)
        if q is None:
            return JSONResponse({"error": "not a track of this review queue"}, status_code=404)
        if not Path(q.path).is_file():
            return JSONResponse({"error": f"{q.path}: the file has vanished"}, status_code=410)
        return FileResponse(q.path, headers={"Cache-Control": "no-store"})  # Range: 206 / 416

    return app


def serve_review(
    db: str | os.PathLike,
    model: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8770,
    reviewer: str = "",
    announce=None,
    **queue_options,
) -> None:
    """Serve the review page until interrupted (uvicorn); ``announce(url, state)`` is called once
    the queue is built, before the server starts."""
    import uvicorn

    allowed = LOOPBACK if host in LOOPBACK else (*LOOPBACK, host.lower())
    app = create_review_app(db, model, reviewer=reviewer, allowed_hosts=allowed, **queue_options)
    if announce is not None:
        announce(f"http://{host if ':' not in host else f'[{host}]'}:{port}/", app.state.review)
    uvicorn.run(app, host=host, port=port, log_level="warning")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>embedkit review</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style nonce="__NONCE__">
body{font:15px/1.4 system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.2rem}.kind{display:inline-block;padding:.1rem .5rem;border-radius:.6rem;font-size:.8rem;color:#fff}
.uncertain{background:#8a5cf6}.disagree{background:#d9480f}.random{background:#2b8a3e}
#name{font-weight:600;word-break:break-all}.bar{display:flex;gap:.5rem;align-items:center;margin:.15rem 0}
.bar .fill{background:#4c6ef5;height:.7rem}.bar .lab{width:9rem}.bar .pct{width:3.5rem;text-align:right}
#classes button{margin:.2rem}#status{color:#555;min-height:1.3rem}#gone{color:#c92a2a}
kbd{border:1px solid #aaa;border-radius:3px;padding:0 .3rem;font-size:.85rem}
</style></head><body>
<h1>embedkit review <span id="progress"></span></h1>
<p><label>reviewer <input id="reviewer" value="__REVIEWER__" size="12"></label>
 &nbsp;<kbd>a</kbd> accept <kbd>1</kbd>-<kbd>9</kbd> correct <kbd>s</kbd> skip <kbd>space</kbd> play/pause</p>
<section id="card" hidden>
<p><span id="kind" class="kind"></span> <span id="name"></span></p>
<p>decision: <b id="decision"></b> (<span id="confidence"></span>)<span id="tag"></span></p>
<div id="bars"></div>
<audio id="player" controls preload="metadata"></audio>
<p id="gone" hidden></p>
<p><button id="accept">accept (a)</button> <button id="skip">skip (s)</button></p>
<div id="classes"></div>
</section>
<p id="done" hidden>Nothing left to review in this queue.</p>
<p id="status" data-state="loading"></p>
<script nonce="__NONCE__">
const TOKEN = "__TOKEN__";
const $ = id => document.getElementById(id);
let current = null, classes = [], busy = false;
$("reviewer").value = $("reviewer").value || localStorage.getItem("embedkit-reviewer") || "";
$("reviewer").addEventListener("change", () => localStorage.setItem("embedkit-reviewer", $("reviewer").value));
function pct(p) { return (100 * p).toFixed(0) + "%"; }
async function load() {
  $("status").dataset.state = "loading";
  const r = await fetch("/api/next?reviewer=" + encodeURIComponent($("reviewer").value));
  const d = await r.json();
  classes = d.classes;
  $("progress").textContent = "(" + d.labelled + " labelled, " + d.remaining + " left)";
  current = d.item || null;
  $("card").hidden = !current; $("done").hidden = !!current;
  if (current) {
    $("kind").textContent = current.kind; $("kind").className = "kind " + current.kind;
    $("name").textContent = current.name; $("decision").textContent = current.decision;
    $("confidence").textContent = pct(current.confidence);
    $("tag").textContent = current.tag ? "; its own tag says " + current.tag : "";
    $("bars").replaceChildren(...current.top.map(([lab, p]) => {
      const row = document.createElement("div"); row.className = "bar"; row.dataset.label = lab;
      const l = document.createElement("span"); l.className = "lab"; l.textContent = lab;
      const f = document.createElement("span"); f.className = "fill"; f.style.width = (12 * p) + "rem";
      const v = document.createElement("span"); v.className = "pct"; v.textContent = pct(p);
      row.append(l, f, v); return row; }));
    $("classes").replaceChildren(...classes.map((c, i) => {
      const b = document.createElement("button"); b.textContent = (i < 9 ? (i + 1) + " " : "") + c;
      b.dataset.label = c; b.addEventListener("click", () => send("correct", c)); return b; }));
    $("gone").hidden = current.available; $("gone").textContent = current.available ? "" : "the file has vanished: " + current.path;
    $("player").src = current.available ? "/audio/" + current.fingerprint : "";
    $("accept").disabled = current.decision === "uncertain";
  }
  $("status").textContent = ""; $("status").dataset.state = "ready";
}
async function send(action, label) {
  if (!current || busy) return;
  busy = true; $("status").dataset.state = "sending";
  try {
    const r = await fetch("/api/label", {method: "POST",
      headers: {"Content-Type": "application/json", "X-Review-Token": TOKEN},
      body: JSON.stringify({fingerprint: current.fingerprint, action, label, reviewer: $("reviewer").value})});
    const d = await r.json();
    if (!r.ok) { $("status").textContent = d.error; $("status").dataset.state = "error"; return; }
    $("player").pause();
    await load();
  } finally { busy = false; }
}
$("player").addEventListener("error", () => { if (current && current.available) {
  $("gone").hidden = false; $("gone").textContent = "cannot play " + current.path; } });
$("accept").addEventListener("click", () => send("accept"));
$("skip").addEventListener("click", () => send("skip"));
document.addEventListener("keydown", e => {
  if (e.target.tagName === "INPUT") return;
  if (e.key === "a") send("accept");
  else if (e.key === "s") send("skip");
  else if (e.key === " ") { e.preventDefault(); const p = $("player"); p.paused ? p.play() : p.pause(); }
  else if (/^[1-9]$/.test(e.key) && classes[+e.key - 1]) send("correct", classes[+e.key - 1]);
});
load();
</script></body></html>
"""
