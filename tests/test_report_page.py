"""report.html and the sweep's index page (runner.report_page), in a real browser where there is one."""
from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from runner.report_page import report_html, sweep_index_html
from tasks.keypoint_errors import KEYPOINT_NAMES, analyze_keypoint_errors
from tasks.skeleton import SKELETON, encode_png, limb_colour, render
from tasks.timeline import CallSpan, Marker, ShardSpan, build_timeline
from test_keypoint_errors import A, one_error_each

T0 = 1_760_000_000.0
DEVICES = [("npu:0", "10.0.0.1"), ("npu:1", "10.0.0.1"), ("cuda:0 <fast> & co", "gpu-node")]
#: Attributes that would make a browser load something: src, href, and SVG's xlink:href.
LOADS = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)
DATA_IMAGE = re.compile(r'<img src="data:image/(?:png|jpeg);base64,([A-Za-z0-9+/=]+)"')


def device_rows() -> list[dict]:
    return [{"device": d, "node": n, "boxes": 100 + k, "fps": 50.5, "p50_ms": 10.0, "p90_ms": 12.5, "p99_ms": 30.25}
            for k, (d, n) in enumerate(DEVICES)]


def trace() -> dict:
    shards = [ShardSpan(d, n, k, 64, T0 + 0.5 + k, T0 + 2.0 + k) for k, (d, n) in enumerate(DEVICES)]
    shards.append(ShardSpan("npu:0", "10.0.0.1", 2, 64, T0 + 3.0, T0 + 4.0, copy=True, won=False))
    calls = [CallSpan(d, n, T0 + 0.6 + k + 0.02 * c, 0.015) for k, (d, n) in enumerate(DEVICES) for c in range(40)]
    markers = [Marker(T0 + 3.0, "copy_sent", "copy of shard 2 sent", "npu:0", "10.0.0.1"),
               Marker(T0 + 4.5, "queue_empty", "queue empty")]
    return build_timeline(shards, calls, markers, run_start=T0)


def person_image(k: int) -> tuple[str, bytes]:
    """A drawn person on a plain background, its caption holding markup that must be escaped."""
    image = np.full((300, 320, 3), 40 + 20 * k, dtype=np.uint8)
    kpts = np.concatenate([A - [90, 95], np.ones((17, 1))], axis=1)
    return f"person {k} <b>&</b>", encode_png(render(image, [kpts], thickness=5))


@pytest.fixture(scope="module")
def analysis() -> dict:
    gt, results, _ = one_error_each()
    return analyze_keypoint_errors(gt, results)


@pytest.fixture(scope="module")
def page(analysis) -> str:
    return report_html("run <bs 16>", {"mAP": 0.7123, "boxes": 300, "complete": True, "model": "fastpose"},
                       device_rows(), trace(), analysis,
                       {"backend": "om", "max_abs_px": 0.25, "verdict": "pass", "tolerance": {"name": "fp16"}},
                       [person_image(k) for k in range(8)])


def test_report_embeds_every_image_and_loads_nothing(page):
    assert len(DATA_IMAGE.findall(page)) == 8
    assert not LOADS.search(page)
    assert "http:" not in page and "https:" not in page
    assert re.search(r"Content-Security-Policy\" content=\"default-src &#x27;none&#x27;", page)
    assert "<script" not in page.lower() and "@import" not in page and "url(" not in page


def test_report_names_every_device_and_escapes_text(page):
    for device, node in DEVICES:
        esc = device.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        assert f"<td class=\"l\">{esc}</td><td class=\"l\">{node}</td>" in page  # the table
        assert f">{esc} @ {node}</text>" in page  # the timeline's lane
    assert "<fast>" not in page and "<b>&</b>" not in page and "person 0 &lt;b&gt;&amp;&lt;/b&gt;" in page
    assert "<title>run &lt;bs 16&gt;</title>" in page


def test_report_holds_the_figures(page):
    assert "<td>0.7123</td>" in page and "<td>300</td>" in page and "<td>yes</td>" in page
    assert "<td>30.25</td>" in page  # p99
    for name in KEYPOINT_NAMES:
        assert f'<td class="l">{name}</td>' in page
    assert 'class="pass">PASS<' in page
    assert page.count("<rect") >= 4  # the shards drawn as lanes
    assert "Ronchi" in page


def test_report_without_analysis_parity_or_timeline_still_renders():
    page = report_html("synthetic", {"mAP": None, "boxes": 5, "complete": False}, device_rows()[:1])
    assert "<td>n/a</td>" in page and "no analysis" in page and "no timeline" in page and "Parity" not in page


def test_gallery_images_are_real_renderings(page):
    """The embedded picture shows the skeleton: each limb's midpoint has its prediction colour."""
    first = base64.b64decode(DATA_IMAGE.findall(page)[0])
    image = cv2.cvtColor(cv2.imdecode(np.frombuffer(first, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    xy = A - [90, 95]
    hits = [tuple(image[tuple(np.round((xy[a] + xy[b]) / 2).astype(int)[::-1])]) == limb_colour(a, b)
            for a, b in SKELETON]
    assert sum(hits) >= 15
    assert tuple(image[5, 5]) == (40, 40, 40)


def test_sweep_index_links_pages_and_embeds_the_plot():
    plot = encode_png(np.full((60, 80, 3), 200, dtype=np.uint8))
    rows = [{"bs": 1, "mAP": 0.71, "crops/s": 40.0}, {"bs": 16, "mAP": 0.71, "crops/s": 120.5}]
    page = sweep_index_html("sweep", rows, [("bs 1", "bs1/report.html"), ("bs 16", "bs16/report.html")], plot,
                            {"bs": 16, "crops/s": 120.5})
    assert '<a href="bs1/report.html">bs 1</a>' in page and '<a href="bs16/report.html">bs 16</a>' in page
    assert len(DATA_IMAGE.findall(page)) == 1 and not LOADS.search(page)
    assert "<td>120.5</td>" in page
    with pytest.raises(ValueError, match="relative"):
        sweep_index_html("sweep", rows, [("bs 1", "https://example.com/bs1.html")])


# ---------------------------------------------------------------- headless Chromium


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it where it may)")


def open_in_chromium(html: Path, shot: Path) -> tuple[np.ndarray, list[str]]:
    """Screenshot of the page as headless Chromium renders it, and the console messages it logged."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={shot.parent / 'profile'}", "--enable-logging=stderr", "--v=0",
           f"--screenshot={shot}", "--window-size=1200,2000", html.as_uri()]
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("chromium did not finish in 90 s")
    if run.returncode != 0 or not shot.is_file():
        reason = f"chromium cannot run here (rc {run.returncode}): {run.stderr.strip()[-300:]}"
        if os.geteuid() != 0:
            pytest.skip(reason)  # e.g. no user namespaces for a non-root user
        pytest.fail(reason)
    # Chromium logs every console message (errors, CSP refusals, uncaught exceptions) as :CONSOLE.
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    return cv2.imread(str(shot), cv2.IMREAD_COLOR), console


@pytest.mark.skipif(sys.platform != "linux", reason="the browser check runs on Linux")
def test_report_renders_in_headless_chromium_without_console_errors(page, tmp_path):
    path = tmp_path / "report.html"
    path.write_text(page, encoding="utf-8")
    shot, console = open_in_chromium(path, tmp_path / "shot.png")
    assert console == []
    assert shot.shape[:2] == (2000, 1200)
    grey = cv2.cvtColor(shot, cv2.COLOR_BGR2GRAY)
    assert grey.std() > 20  # not blank: text, tables, lanes and pictures
    assert (grey < 128).mean() > 0.02
    # The timeline's shard colour is on screen, so the SVG was drawn.
    assert (np.abs(shot.astype(int) - [0xd6, 0x7f, 0x4a]).sum(axis=2) < 10).sum() > 200


@pytest.mark.skipif(sys.platform != "linux", reason="the browser check runs on Linux")
def test_the_console_check_sees_errors_and_blocked_loads(tmp_path):
    """The check above can fail: a page with a script error and a remote image is caught."""
    path = tmp_path / "bad.html"
    path.write_text('<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" '
                    "content=\"default-src 'none'; script-src 'unsafe-inline'\"></head><body>"
                    '<img src="https://example.invalid/x.png"><script>throw new Error("boom")</script></body></html>')
    _, console = open_in_chromium(path, tmp_path / "shot.png")
    assert any("Uncaught Error: boom" in line for line in console)
    assert any("example.invalid" in line for line in console)
