"""The report in a real browser: headless Chromium renders it offline, takes a screenshot and
dumps the DOM. Passes when the page loads without console messages (the report has no script,
so any console message is an error: a blocked resource, a parse error), the screenshot shows
the styled page, and the rendered DOM holds the leaderboard in accuracy order.

Skips when Chromium is absent. Debian: `apt-get install -y chromium` (CI installs it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from helpers import make_runs

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find_chromium() -> str | None:
    env = os.environ.get("EMBEDKIT_CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


CHROMIUM = _find_chromium()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium not installed (Debian: apt-get install -y chromium)"),
]


def chromium(tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    """One headless run, isolated profile, nothing fetched from the network."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
        url,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    # Chromium logs every console message (errors included) as "...:CONSOLE(line)] "text", source: ..."
    return [line for line in stderr.splitlines() if re.search(r":CONSOLE[(:]", line)]


class _Leaderboard(HTMLParser):
    """Run names (link text) of the rendered leaderboard rows, in order."""

    def __init__(self):
        super().__init__()
        self.in_table = self.in_link = False
        self.names: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and "leaderboard" in (a.get("class") or ""):
            self.in_table = True
        if self.in_table and tag == "a":
            self.in_link = True
            self.names.append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self.in_table = False
        if tag == "a":
            self.in_link = False

    def handle_data(self, data):
        if self.in_link:
            self.names[-1] += data


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from embedkit.report import build_report

    root = tmp_path_factory.mktemp("browser")
    make_runs(root / "runs")
    out, ctx = build_report([root / "runs"], root / "report.html")
    return root, out, ctx


def test_console_check_catches_errors(tmp_path):
    """The console check can fail: a page with a script error is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><body><p>x</p><script>console.error('boom'); notDefined();</script></body></html>"
    )
    res = chromium(tmp_path, bad.as_uri(), "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    msgs = console_messages(res.stderr)
    assert any("notDefined" in m for m in msgs), res.stderr[-2000:]


def test_report_renders_in_chromium(report, tmp_path):
    from PIL import Image, ImageStat

    root, out, ctx = report
    shot = tmp_path / "report.png"
    res = chromium(tmp_path, out.as_uri(), f"--screenshot={shot}", "--window-size=1400,3000")
    assert res.returncode == 0, res.stderr[-2000:]
    assert console_messages(res.stderr) == []
    assert shot.exists() and shot.stat().st_size > 20_000
    img = Image.open(shot).convert("RGB")
    assert img.size == (1400, 3000)
    # Non-blank: real contrast and many colours (text, charts, badges), not one flat fill.
    assert ImageStat.Stat(img.convert("L")).stddev[0] > 20
    assert len(img.resize((350, 750)).getcolors(1 << 20) or []) > 200
    # The inline CSS applied: the header band is the report's dark blue (#17324d).
    r, g, b = img.getpixel((5, 5))
    assert abs(r - 0x17) < 12 and abs(g - 0x32) < 12 and abs(b - 0x4D) < 12, (r, g, b)


def test_rendered_dom_has_leaderboard(report, tmp_path):
    root, out, ctx = report
    res = chromium(tmp_path, out.as_uri(), "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    assert console_messages(res.stderr) == []
    dom = res.stdout
    assert 'id="leaderboard"' in dom and "<svg" in dom
    lb = _Leaderboard()
    lb.feed(dom)
    assert lb.names == [v.label for v in ctx["runs"]]
    assert len(lb.names) == len(ctx["runs"]) >= 5
    # the deployment section rendered: per calibrated run a reliability diagram and a coverage
    # curve with the default threshold marked
    n_cal = sum(1 for v in ctx["runs"] if v.m.get("calibration"))
    assert 'id="deployment"' in dom and n_cal >= 5
    assert dom.count('class="default-threshold"') == n_cal
    assert dom.count("reliability before and after calibration</title>") == n_cal
