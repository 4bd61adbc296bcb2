"""`embedkit review`: a local page to confirm or correct the model's genres, one track at a time.

    app = create_review_app("library.sqlite")         # FastAPI; `embedkit review` serves it

The queue (``build_queue``) mixes three sources, each marked on the page:

- ``teach``: tracks chosen to teach the most (``choose_to_label``): the regions of the library no
  labelled track covers yet (k-means clusters of the track vectors ``embedkit tag`` keeps, else
  of the probabilities), the largest first, each shown by its most typical track: spread out and
  representative. Measured against the model's doubt (margin sampling, alone or spread out) on
  gtzan_mini, this taught more per label, so the model's doubt only orders what is left when
  every candidate is asked for. The same function is the choice ``bench/bench_library.py``
  measures against random;
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
from .serve import LOOPBACK_HOSTS, host_name  # one reading of a Host header for both servers

KINDS = ("teach", "disagree", "random")
TYPICAL_K = 5  # neighbours of a track's typicality (its density among its cluster's tracks)


def margin_uncertainty(prob: np.ndarray) -> np.ndarray:
    """1 - (p_first - p_second) per row of ``prob`` [N, C]: 1 where the two top classes tie."""
    prob = np.asarray(prob, dtype=np.float64)
    if prob.shape[1] < 2:
        return 1.0 - prob[:, 0]
    top2 = np.sort(prob, axis=1)[:, -2:]
    return 1.0 - (top2[:, 1] - top2[:, 0])


def _typicality(F: np.ndarray, k: int = TYPICAL_K) -> np.ndarray:
    """1 / mean distance to the ``k`` nearest other rows of ``F`` (all 1 for a single row)."""
    if len(F) < 2:
        return np.ones(len(F))
    k = min(k, len(F) - 1)
    if len(F) <= 2048:  # a cluster of a library: exact, in one matrix (no thread pool to wait on)
        sq = (F * F).sum(axis=1)
        d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * F @ F.T, 0.0))
        d = np.sort(d, axis=1)[:, : k + 1]
    else:
        from sklearn.neighbors import NearestNeighbors

        d, _ = NearestNeighbors(n_neighbors=k + 1).fit(F).kneighbors(F)
    return 1.0 / (d[:, 1:].mean(axis=1) + 1e-12)


def choose_to_label(
    prob: np.ndarray | None,
    n: int,
    features: np.ndarray | None = None,
    labelled: np.ndarray | None = None,
    seed: int = 0,
) -> list[int]:
    """Indices of ``n`` candidates worth labelling, in the order to show them: the queue's
    "teach" source, and the choice ``bench/bench_library.py`` measures against random.

    prob: [N, C] the model's probabilities of the candidates (None: no model yet, the cold
    start); features: [N, D] their track vectors (default: prob); labelled: [M, D] vectors of
    tracks already labelled. The vectors (standardised) are cut into M + n k-means clusters;
    the clusters no labelled track falls in are the regions nobody has taught the model yet;
    the largest come first, each represented by its most typical track (densest among its own,
    not an outlier), so a batch is spread out and representative (TypiClust, Hacohen et al.
    2022); with no labels and no model this is a k-means cold start. The model's
    probabilities only order the candidates when all of them are asked for (n >= N), or fill
    a batch when k-means leaves fewer than n regions untaught (duplicate vectors); measured,
    ranking regions by the model's doubt taught less (README).
    Chosen by measurement against margin sampling (alone, and spread out by uncertainty-
    weighted farthest points), density-weighted margin, cluster-margin, and the same clusters
    ranked or represented by the model's doubt: on gtzan_mini it needs far fewer labels than
    random choice for 90 and 95 % of the whole-pool accuracy (bench/bench_library.py; README)."""
    if n <= 0 or (prob is None and features is None):
        return []
    from sklearn.cluster import KMeans

    X = np.asarray(features if features is not None else prob, dtype=np.float64)
    N = len(X)
    if N == 0:
        return []
    if n >= N:
        unc = margin_uncertainty(prob) if prob is not None else np.zeros(N)
        return [int(i) for i in np.argsort(-unc, kind="stable")]
    L = np.asarray(labelled, dtype=np.float64).reshape(-1, X.shape[1]) if labelled is not None else X[:0]
    A = np.vstack([L, X])
    mu, sd = A.mean(axis=0), A.std(axis=0)
    A = (A - mu) / np.where(sd > 0, sd, 1.0)
    k = min(len(L) + n, len(A))
    cl = KMeans(k, n_init=3, random_state=seed).fit(A).labels_
    covered = set(cl[: len(L)].tolist())
    cand = cl[len(L) :]
    unc = margin_uncertainty(prob) if prob is not None else np.ones(N)
    F = A[len(L) :]
    groups = [np.flatnonzero(cand == c) for c in range(k) if c not in covered]
    groups = [g for g in groups if len(g)]
    # the largest untaught region first. Ranking by size x the model's mean doubt, or by doubt
    # between regions of one size, lowered the simulated curve (about 0.02 at 30-40 labels):
    # on a few labels, covering the library teaches more than chasing the model's doubts
    groups.sort(key=lambda g: (-len(g), int(g[0])))
    chosen = [int(g[np.argmax(_typicality(F[g]))]) for g in groups[:n]]
    if len(chosen) < n:  # labelled tracks share every cluster left: the least certain of the rest
        taken = set(chosen)
        chosen += [int(i) for i in np.argsort(-unc, kind="stable") if int(i) not in taken][: n - len(chosen)]
    return chosen


@dataclass
class QueueItem:
    fingerprint: str
    path: str
    kind: str  # teach | disagree | random
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
    ``db``): tracks nobody labelled yet, interleaved teach, disagree, teach, random."""
    from .library import _newest_by_path, _pick_model, audit, current_labels, existing_db
    from .resultsdb import ResultsDB

    if not 0 <= random_share < 1:
        raise EmbedkitError(f"--random-share must be in [0, 1), got {random_share}")
    with ResultsDB(existing_db(db)) as rdb:
        model_id, labels, _ = _pick_model(rdb, model)
        rows = rdb.rows(model_id)
        done = set(current_labels(rdb))
    newest = [
        r for r in _newest_by_path(rows).values() if r.get("probabilities")
    ]  # a path tagged again: its latest row
    known = [r for r in newest if r["fingerprint"] in done]  # labelled: their regions are taught
    rows = sorted((r for r in newest if r["fingerprint"] not in done), key=lambda r: r["path"])
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
        probs = lambda rs: np.array([[float(r["probabilities"].get(c, 0.0)) for c in labels] for r in rs])  # noqa: E731
        P = probs(rest)
        known += [by_fp[fp] for fp in sorted(taken)]  # the queue's random and disagree tracks will be labelled too
        vecs = _track_vectors(db, model_id, [r["fingerprint"] for r in rest + known])
        if vecs is not None and all(r["fingerprint"] in vecs for r in rest):
            feats = np.stack([vecs[r["fingerprint"]] for r in rest])
            have = [vecs[r["fingerprint"]] for r in known if r["fingerprint"] in vecs]
            taught = np.stack(have) if have else None
        else:  # no track vectors: the queue spreads out in probability space
            feats, taught = None, (probs(known) if known else None)
        chosen = choose_to_label(P, k, features=feats, labelled=taught, seed=seed)
        teach = [item(rest[i], "teach") for i in chosen]
    else:
        teach = []
    queue: list[QueueItem] = []
    pattern = ("teach", "disagree", "teach", "random")
    pools = {"teach": teach, "disagree": disagree, "random": randoms}
    while any(pools.values()):
        for kind in pattern:
            if pools[kind]:
                queue.append(pools[kind].pop(0))
    return model_id, labels, queue


def _track_vectors(db, model_id: str, fingerprints: list[str]) -> dict[str, np.ndarray] | None:
    """{fingerprint: the model's track vector} for those of ``fingerprints`` that have one
    (``embedkit tag`` keeps them: the embedding the model's head reads, ``deploy.vectors``);
    None when the database keeps no vectors."""
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
    if len({v.shape for v in found.values()}) > 1:
        return None
    return found


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


def create_review_app(
    db: str | os.PathLike,
    model: str | None = None,
    *,
    reviewer: str = "",
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS,
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
        host = request.headers.get("host")
        if not host or host_name(host) not in allowed_hosts:
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

    allowed = LOOPBACK_HOSTS if host in LOOPBACK_HOSTS else (*LOOPBACK_HOSTS, host_name(host))
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
.teach{background:#8a5cf6}.disagree{background:#d9480f}.random{background:#2b8a3e}
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
