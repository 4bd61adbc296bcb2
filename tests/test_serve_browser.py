"""The page at / in headless Chromium, driven over the DevTools protocol (``--remote-debugging-
pipe``: JSON messages on file descriptors 3/4, no extra client library). It loads the page from
a real server on 127.0.0.1, sets a real gtzan_mini file (generated when absent) on the file
input as a person choosing it would, waits for the rendered result and reads it: the decision
and the probability bars must be the server's answer for that file, and the page must log no
console message or exception. Skips when Chromium is absent."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from pathlib import Path

import pytest
from conftest import GTZAN
from test_report_browser import CHROMIUM

pytest.importorskip("fastapi")
requests = pytest.importorskip("requests")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install -y chromium)")

from test_serve import run_dir, running, tagger  # noqa: E402,F401  (fixtures)


class DevTools:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe."""

    def __init__(self, profile: Path):
        to_r, self._to_w = os.pipe()  # we write commands -> chromium reads fd 3
        self._from_r, from_w = os.pipe()  # chromium writes fd 4 -> we read

        def child_fds():  # runs in the child before exec: the pipe ends become fds 3 and 4
            a, b = os.dup(to_r), os.dup(from_w)  # above 4, so the dup2s below cannot clobber them
            os.dup2(a, 3)
            os.dup2(b, 4)

        cmd = [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank",
        ]  # fmt: skip
        self.log = open(profile.parent / "chromium.log", "wb")
        # pass_fds keeps 3 and 4 open through exec (fds are closed after preexec_fn runs)
        self.proc = subprocess.Popen(cmd, preexec_fn=child_fds, pass_fds=(3, 4, to_r, from_w), stdout=self.log, stderr=self.log)
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._id = 0
        self.events: list[dict] = []

    def _read(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_r], [], [], left)[0]:
                return None
            chunk = os.read(self._from_r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self._read(deadline - time.monotonic())
            if m is None:
                break
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)
        raise TimeoutError(method)

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._to_w)
        os.close(self._from_r)
        self.log.close()


def test_page_tags_a_chosen_file(tmp_path, request, tagger):
    from embedkit.serve import create_app

    if GTZAN.exists():
        audio_file = sorted((GTZAN / "jazz").glob("*.flac"))[0]
    else:
        audio_file = sorted(Path(request.getfixturevalue("synth_dataset")).glob("*/*.wav"))[0]
    with running(create_app(tagger)) as base:
        want = requests.post(f"{base}/v1/tag", data=audio_file.read_bytes(), headers={"Content-Type": "application/octet-stream"}, timeout=120).json()
        dt = DevTools(tmp_path / "profile")
        try:
            target = dt.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            sid = dt.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "DOM"):
                dt.send(f"{domain}.enable", session=sid)
            dt.send("Page.navigate", {"url": f"{base}/"}, session=sid)

            def evaluate(expr: str):
                return dt.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session=sid)["result"].get("value")

            deadline = time.monotonic() + 30
            while evaluate("document.readyState") != "complete" or "genres" not in (evaluate("document.getElementById('model').textContent") or ""):
                assert time.monotonic() < deadline, "page did not load"
                time.sleep(0.1)
            doc = dt.send("DOM.getDocument", session=sid)["root"]["nodeId"]
            node = dt.send("DOM.querySelector", {"nodeId": doc, "selector": "#file"}, session=sid)["nodeId"]
            dt.send("DOM.setFileInputFiles", {"files": [str(audio_file)], "nodeId": node}, session=sid)
            deadline = time.monotonic() + 120
            while evaluate("document.getElementById('result').dataset.state") not in ("done", "error"):
                assert time.monotonic() < deadline, "no result rendered"
                time.sleep(0.2)
            state = evaluate("document.getElementById('result').dataset.state")
            decision = evaluate("document.getElementById('decision').textContent")
            bars = evaluate("[...document.querySelectorAll('#bars .bar')].map(b => [b.dataset.label, b.querySelector('.pct').textContent])")
            timing = evaluate("document.getElementById('timing').textContent")
            n_before = len(dt.events)
            # the detector's own check: a console message the page did not write is seen
            dt.send("Runtime.evaluate", {"expression": "console.error('embedkit-probe')"}, session=sid)
            dt.send("Runtime.evaluate", {"expression": "1"}, session=sid)  # flush pending events
        finally:
            dt.close()
    assert state == "done", decision
    assert decision == want["decision"]
    assert [b[0] for b in bars] == sorted(want["probabilities"], key=lambda k: -want["probabilities"][k])
    for label, pct in bars:
        assert pct == f"{100 * want['probabilities'][label]:.1f}%"
    assert "total" in timing and "windows" in timing
    kinds = ("Runtime.exceptionThrown", "Runtime.consoleAPICalled", "Log.entryAdded")
    assert any(e.get("method") == "Runtime.consoleAPICalled" and "embedkit-probe" in json.dumps(e) for e in dt.events[n_before:])
    bad = [e for e in dt.events[:n_before] if e.get("method") in kinds]
    assert not bad, bad[:3]
