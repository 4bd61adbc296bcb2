"""The page ``embedkit serve`` answers at ``/``: self-contained (inline style and script, system
fonts, nothing fetched but the service's own endpoints). Drop or choose an audio file; the
page POSTs it to /v1/tag as the raw body and shows the genres as probability bars, the decision
("uncertain" shown as such) and the timings. ``#result[data-state]`` is "idle", "busy",
"done" or "error" (the browser test waits on it). A server with a results database (``--db``)
also lists the library's tracks most similar to the file (``POST /v1/similar``) under
``#similar`` (``page(similar=True)`` marks the body; without a database the page never asks). A server started with ``--token`` answers
401: the page then shows a token field and sends ``Authorization: Bearer`` with what is typed
(kept in this tab's sessionStorage only)."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>embedkit: what genre is this?</title>
<style>
  :root { --fg: #1d232b; --muted: #5b6673; --accent: #2f6fdf; --warn: #b35c00; --bg: #f6f7f9; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 16px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); background: var(--bg); }
  main { max-width: 720px; margin: 2rem auto; padding: 0 1rem; }
  h1 { font-size: 1.5rem; margin: 0 0 .25rem; }
  p.sub { color: var(--muted); margin: 0 0 1.25rem; }
  #drop { border: 2px dashed #9aa7b6; border-radius: 10px; padding: 2rem; text-align: center; background: #fff; cursor: pointer; }
  #drop.over { border-color: var(--accent); background: #eef4ff; }
  #drop input { display: block; margin: .75rem auto 0; }
  #result { margin-top: 1.5rem; background: #fff; border-radius: 10px; padding: 1.25rem; min-height: 3rem; }
  #decision { font-size: 1.4rem; font-weight: 600; margin: 0 0 .75rem; }
  #decision.uncertain { color: var(--warn); }
  .bar { display: grid; grid-template-columns: 8rem 1fr 4.5rem; align-items: center; gap: .5rem; margin: .3rem 0; }
  .track { background: #e5e9ef; border-radius: 4px; height: 1rem; overflow: hidden; }
  .fill { background: var(--accent); height: 100%; }
  .pct { text-align: right; font-variant-numeric: tabular-nums; }
  #timing, #model { color: var(--muted); font-size: .9rem; margin-top: .75rem; }
  #error { color: #b00020; }
</style>
</head>
<body data-similar="{similar}">
<main>
  <h1>What genre is this?</h1>
  <p class="sub" id="model">loading model&hellip;</p>
  <form id="auth" hidden><label>This server needs its token:
    <input id="token" type="password" autocomplete="off"></label> <button>Use</button></form>
  <label id="drop" for="file">Drop an audio file here, or choose one
    <input id="file" type="file" accept="audio/*,.wav,.flac,.ogg,.mp3,.aif,.aiff">
  </label>
  <section id="result" data-state="idle" aria-live="polite">
    <p id="decision"></p>
    <div id="bars"></div>
    <p id="timing"></p>
    <p id="error"></p>
  </section>
  <section id="similar" data-state="idle" hidden>
    <h2>Similar in the library</h2>
    <ol id="similar-list"></ol>
  </section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const result = $("result");

function show(state) { result.dataset.state = state; }

function clear() {
  $("decision").textContent = ""; $("decision").className = "";
  $("bars").replaceChildren(); $("timing").textContent = ""; $("error").textContent = "";
}

function render(r) {
  clear();
  const d = $("decision");
  d.textContent = r.decision === "uncertain" ? "uncertain (top: " + r.top_label + ")" : r.decision;
  if (r.decision === "uncertain") d.className = "uncertain";
  const rows = Object.entries(r.probabilities).sort((a, b) => b[1] - a[1]);
  for (const [label, p] of rows) {
    const row = document.createElement("div"); row.className = "bar"; row.dataset.label = label;
    const name = document.createElement("span"); name.textContent = label;
    const track = document.createElement("div"); track.className = "track";
    const fill = document.createElement("div"); fill.className = "fill"; fill.style.width = (100 * p).toFixed(1) + "%";
    track.appendChild(fill);
    const pct = document.createElement("span"); pct.className = "pct"; pct.textContent = (100 * p).toFixed(1) + "%";
    row.append(name, track, pct); $("bars").appendChild(row);
  }
  const t = r.timings_ms;
  $("timing").textContent = "decode " + t.decode.toFixed(0) + " ms, model " + t.inference.toFixed(0) +
    " ms, total " + t.total.toFixed(0) + " ms; " + r.n_windows + " windows (" + r.excerpt + ")";
  show("done");
}

function auth() {
  const t = sessionStorage.getItem("embedkit-token");
  return t ? { "Authorization": "Bearer " + t } : {};
}

async function tagFile(file) {
  clear(); show("busy"); $("decision").textContent = "listening to " + file.name + "\\u2026";
  try {
    const headers = Object.assign({ "Content-Type": file.type || "application/octet-stream" }, auth());
    const resp = await fetch("/v1/tag", { method: "POST", body: file, headers: headers });
    if (resp.status === 401) $("auth").hidden = false;
    const body = await resp.json();
    if (!resp.ok) { clear(); $("error").textContent = body.error ? body.error.message : ("HTTP " + resp.status); show("error"); return; }
    render(body);
    if (document.body.dataset.similar === "yes") similarTo(file);
  } catch (e) {
    clear(); $("error").textContent = String(e); show("error");
  }
}

// A server started with --db also answers POST /v1/similar: the library's tracks most like the file.
async function similarTo(file) {
  const box = $("similar"), list = $("similar-list");
  list.replaceChildren(); box.hidden = true; box.dataset.state = "busy";
  try {
    const headers = Object.assign({ "Content-Type": file.type || "application/octet-stream" }, auth());
    const resp = await fetch("/v1/similar?k=10", { method: "POST", body: file, headers: headers });
    const body = await resp.json();
    if (!resp.ok) { box.dataset.state = "none"; return; }
    for (const h of body.results) {
      const li = document.createElement("li");
      li.textContent = (h.artist ? h.artist + " \u2013 " : "") + (h.title || h.path.split("/").pop()) +
        " (" + (h.decision || "?") + ", " + h.score.toFixed(2) + ")";
      li.title = h.path; list.appendChild(li);
    }
    box.hidden = false; box.dataset.state = "done";
  } catch (e) { box.dataset.state = "none"; }
}

$("file").addEventListener("change", (e) => { if (e.target.files.length) tagFile(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) tagFile(e.dataTransfer.files[0]);
});

function loadModel() {
  fetch("/v1/model", { headers: auth() }).then(async (r) => {
    const m = await r.json();
    if (r.status === 401) { $("auth").hidden = false; $("model").textContent = m.error.message; return; }
    if (!r.ok) { $("model").textContent = "model unavailable: " + (m.error ? m.error.message : r.status); return; }
    $("auth").hidden = true;
    $("model").textContent = m.kind + " model " + m.model_id.slice(0, 12) + ": " + m.labels.length + " genres (" + m.labels.join(", ") + ")";
  }).catch((e) => { $("model").textContent = "model unavailable: " + e; });
}
$("auth").addEventListener("submit", (e) => {
  e.preventDefault(); sessionStorage.setItem("embedkit-token", $("token").value.trim()); loadModel();
});
loadModel();
</script>
</body>
</html>
"""


def page(similar: bool) -> str:
    """The page, with the similar-tracks list switched on when the server answers /v1/similar."""
    return PAGE.replace('data-similar="{similar}"', f'data-similar="{"yes" if similar else "no"}"', 1)
