"""OUT/report.html: one self-contained page per run, and an index page per sweep.

Built as strings from plain dicts, so it can be written by a run, by ``runner report`` or by a
test alike. Nothing is loaded from anywhere: images are data URIs, the timeline is inline
SVG, the style is inline, there is no script, and a Content-Security-Policy forbids any
other load, so the page renders the same offline, from an archive or from a mail.
All text is HTML-escaped.
"""
from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence

from tasks.keypoint_errors import ERROR_CLASSES, FIXABLE, KEYPOINT_NAMES

#: Only inline styles and data: images may load (no network, no files).
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 12px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
table{border-collapse:collapse;margin:4px 0 8px}th,td{padding:3px 9px;border-bottom:1px solid #e6e8ee;text-align:right}
th{background:#f3f5f9;font-weight:600}td.l,th.l{text-align:left}
.kv td:first-child{text-align:left;color:#556}.pass{color:#0a7d32;font-weight:600}.fail{color:#b3261e;font-weight:600}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.gallery figure{margin:0;max-width:340px}
.gallery img{display:block;max-width:100%;border:1px solid #ccd}.gallery figcaption{font-size:12px;color:#445}
.note{color:#667;font-size:12px}.bar{display:inline-block;height:9px;background:#d9534f;vertical-align:middle}
svg text{font:11px system-ui,sans-serif;fill:#223}
"""
#: Timeline drawing: label column and plot width in px, height of a shard lane and of the calls strip.
LABEL_W, PLOT_W, LANE_H, CALL_H, AXIS_H = 190, 900, 14, 6, 22
SHARD_FILL = {"won": "#4a7fd6", "copy won": "#3aa55d", "lost": "#b9bec9"}


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    """A figure as a person reads it: 4 significant digits, ints as ints, None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    return str(value)


def data_uri(image: bytes) -> str:
    """A data URI for PNG or JPEG bytes (told apart by their magic numbers)."""
    mime = "image/jpeg" if image[:2] == b"\xff\xd8" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(image).decode('ascii')}"


def page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{esc(CSP)}\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            "<link rel=\"icon\" href=\"data:,\">"  # stops the browser asking for /favicon.ico
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n<body>\n<h1>{esc(title)}</h1>\n"
            f"{body}\n</body></html>\n")


class _Html(str):
    """Markup made here, put into a table cell as is (everything else is escaped)."""


def table(head: Sequence[str] | None, rows: Sequence[Sequence], left: int = 1, cls: str = "") -> str:
    """An HTML table (no header row when ``head`` is None); the first ``left`` columns are
    left-aligned; cells are ``fmt``-ed and escaped unless made here (``_Html``)."""
    def cell(tag: str, k: int, v) -> str:
        align = ' class="l"' if k < left else ""
        return f"<{tag}{align}>{v if isinstance(v, _Html) else esc(fmt(v))}</{tag}>"

    head_html = "<tr>" + "".join(cell("th", k, h) for k, h in enumerate(head)) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(cell("td", k, v) for k, v in enumerate(r)) + "</tr>" for r in rows)
    attr = f' class="{esc(cls)}"' if cls else ""
    return f"<table{attr}>{head_html}{body}</table>"


# ---------------------------------------------------------------- sections


def summary_section(summary: Mapping) -> str:
    """The run's figures: mAP, boxes, completeness first, then whatever else the run gives."""
    first = [k for k in ("mAP", "boxes", "complete") if k in summary]
    rows = [(k, summary[k]) for k in first + [k for k in summary if k not in first]]
    return "<h2>Summary</h2>" + table(None, rows, cls="kv")


def device_section(devices: Sequence[Mapping]) -> str:
    """The per-device table: one row per device; columns as the rows give them (device, node first)."""
    if not devices:
        return "<h2>Devices</h2><p class=note>no device figures</p>"
    columns = list(dict.fromkeys(["device", "node", *[k for row in devices for k in row]]))
    rows = [[row.get(c) for c in columns] for row in devices]
    return "<h2>Devices</h2>" + table(columns, rows, left=2)


def _tracks(trace: Mapping) -> tuple[dict[int, str], list[dict], list[dict], list[dict]]:
    """Process names by pid, and the shard, call and marker events of a timeline."""
    names, shards, calls, markers = {}, [], [], []
    for e in trace.get("traceEvents", []):
        if e.get("ph") == "M" and e.get("name") == "process_name":
            names[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "X" and e.get("cat") == "shard":
            shards.append(e)
        elif e.get("ph") == "X" and e.get("cat") == "call":
            calls.append(e)
        elif e.get("ph") == "i":
            markers.append(e)
    return names, shards, calls, markers


def _nice_step(span_s: float, ticks: int = 8) -> float:
    raw = max(span_s, 1e-9) / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _merged_spans(events: Sequence[Mapping], scale: float) -> list[tuple[float, float]]:
    """Calls as x-spans in px, neighbours closer than a pixel merged (a run makes thousands)."""
    spans = sorted((e["ts"] * scale, (e["ts"] + e["dur"]) * scale) for e in events)
    merged: list[list[float]] = []
    for x0, x1 in spans:
        if merged and x0 - merged[-1][1] < 1.0:
            merged[-1][1] = max(merged[-1][1], x1)
        else:
            merged.append([x0, x1])
    return [(a, b) for a, b in merged]


def _shard_fill(args: Mapping) -> str:
    if not args.get("won", True):
        return SHARD_FILL["lost"]
    return SHARD_FILL["copy won"] if args.get("copy") else SHARD_FILL["won"]


def timeline_svg(trace: Mapping) -> str:
    """The timeline as lanes: per device its shards (blue; green a copy that won, grey one that lost),
    its backend calls as a strip below them, markers as red lines; time in seconds from the start."""
    names, shards, calls, markers = _tracks(trace)
    pids = sorted(p for p in names if p != 0) or sorted({e["pid"] for e in shards + calls})
    end_us = max([e["ts"] + e["dur"] for e in shards + calls] + [e["ts"] for e in markers] + [1.0])
    scale = PLOT_W / end_us
    lanes = {p: max([e["tid"] for e in shards if e["pid"] == p], default=2) - 1 for p in pids}
    rows, y = [], AXIS_H
    for p in pids:
        label = names.get(p, f"device {p}")
        height = lanes[p] * LANE_H + CALL_H + 8
        rows.append(f'<text x="4" y="{y + LANE_H - 3}">{esc(label)}</text>')
        for e in (e for e in shards if e["pid"] == p):
            a = e.get("args", {})
            x, w = LABEL_W + e["ts"] * scale, max(e["dur"] * scale, 0.5)
            top = y + (e["tid"] - 2) * LANE_H
            tip = f'{e["name"]}: {fmt(a.get("boxes"))} boxes, {e["ts"] / 1e6:.3f}-{(e["ts"] + e["dur"]) / 1e6:.3f} s'
            rows.append(f'<rect x="{x:.1f}" y="{top + 1}" width="{w:.1f}" height="{LANE_H - 2}" '
                        f'fill="{_shard_fill(a)}" stroke="#fff" stroke-width="0.5"><title>{esc(tip)}</title></rect>')
        top = y + lanes[p] * LANE_H + 2
        for x0, x1 in _merged_spans([e for e in calls if e["pid"] == p], scale):
            rows.append(f'<rect x="{LABEL_W + x0:.1f}" y="{top}" width="{max(x1 - x0, 0.5):.1f}" '
                        f'height="{CALL_H}" fill="#e0a030"/>')
        for m in (m for m in markers if m.get("s") == "p" and m["pid"] == p):
            x = LABEL_W + m["ts"] * scale
            rows.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y}" y2="{y + height - 4}" stroke="#d62728" '
                        f'stroke-width="2"><title>{esc(m["name"])}</title></line>')
        y += height
    for m in (m for m in markers if m.get("s") != "p"):
        x = LABEL_W + m["ts"] * scale
        rows.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{AXIS_H - 4}" y2="{y}" stroke="#d62728" '
                    f'stroke-dasharray="4 3"><title>{esc(m["name"])}</title></line>')
    step = _nice_step(end_us / 1e6)
    ticks = []
    for k in range(int(end_us / 1e6 / step) + 1):
        x = LABEL_W + k * step * 1e6 * scale
        ticks.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{AXIS_H - 6}" y2="{y}" stroke="#eef0f4"/>'
                     f'<text x="{x + 2:.1f}" y="{AXIS_H - 9}">{k * step:.4g} s</text>')
    width = LABEL_W + PLOT_W + 40
    # Inline SVG in HTML needs no xmlns: the page holds no URL at all.
    return (f'<svg width="{width}" height="{y + 6}" '
            f'viewBox="0 0 {width} {y + 6}" role="img" aria-label="timeline">'
            + "".join(ticks) + "".join(rows) + "</svg>")


def timeline_section(trace: Mapping | None) -> str:
    if not trace:
        return "<h2>Timeline</h2><p class=note>no timeline recorded</p>"
    legend = ("blue: a shard; green: a copy that won; grey: a copy that lost; orange strip: backend calls; "
              "red: a marker (hover for what). timeline.json opens in Perfetto and chrome://tracing.")
    return f"<h2>Timeline</h2>{timeline_svg(trace)}<p class=note>{esc(legend)}</p>"


def _bar(fraction: float | None) -> _Html:
    width = 0 if not fraction else max(1, round(60 * fraction))
    return _Html(f'<span class="bar" style="width:{width}px"></span>')


def joints_section(analysis: Mapping | None) -> str:
    """Per-joint error classes (coco-analyze) and the AP each fixed class would add."""
    if not analysis:
        return "<h2>Keypoint errors</h2><p class=note>no analysis (the run had no annotation file)</p>"
    head = ["joint", *ERROR_CLASSES, "errors", "median px", "median / sqrt(area)"]
    rows = []
    for name in KEYPOINT_NAMES:
        r = analysis["joints"][name]
        n = sum(r[c] for c in ERROR_CLASSES)
        wrong = n - r["good"]
        rows.append([name, *[r[c] for c in ERROR_CLASSES], _bar(wrong / n if n else None),
                     r["median_error_px"], r["median_error_scale"]])
    out = "<h2>Keypoint errors</h2>" + table(head, rows)
    ap = analysis.get("ap")
    if ap:
        gains = [[c, ap["after_fix"][c], ap["gain"][c]] for c in FIXABLE]
        out += (f"<p>AP on coco-analyze's settings: {esc(fmt(ap['baseline']))} ({esc(ap.get('evaluator', ''))}). "
                "If every error of one class were fixed:</p>" + table(["class", "AP after", "AP gain"], gains))
    out += f"<p class=note>{esc(analysis.get('method', ''))}</p>"
    return out


def parity_section(parity: Mapping | None) -> str:
    if not parity:
        return ""
    verdict = str(parity.get("verdict", ""))
    rows = [(k, _Html(f'<span class="{esc(verdict)}">{esc(verdict.upper())}</span>') if k == "verdict" else v)
            for k, v in parity.items()]
    return "<h2>Parity</h2>" + table(None, rows, cls="kv")


def gallery_section(gallery: Sequence[tuple[str, bytes]]) -> str:
    if not gallery:
        return "<h2>Worst people</h2><p class=note>no images</p>"
    figures = "".join(f'<figure><img src="{data_uri(png)}" alt="{esc(caption)}">'
                      f"<figcaption>{esc(caption)}</figcaption></figure>" for caption, png in gallery)
    note = "Worst first. Predictions bright (orange: left, blue: right, pink: centre); ground truth pale green."
    return f'<h2>Worst people</h2><p class=note>{esc(note)}</p><div class="gallery">{figures}</div>'


# ---------------------------------------------------------------- pages


def report_html(title: str, summary: Mapping, devices: Sequence[Mapping], timeline: Mapping | None = None,
                analysis: Mapping | None = None, parity: Mapping | None = None,
                gallery: Sequence[tuple[str, bytes]] = ()) -> str:
    """The run's report.html.

    ``summary``: {"mAP", "boxes", "complete", ...}; ``devices``: one dict per device
    ({"device", "node", "boxes", "fps", "p50_ms", "p90_ms", "p99_ms", ...}, shown in that
    order); ``timeline``: the timeline.json object; ``analysis``: analysis.json; ``parity``:
    parity.json or None; ``gallery``: (caption, PNG or JPEG bytes), worst first.
    """
    body = "".join([summary_section(summary), device_section(devices), timeline_section(timeline),
                    joints_section(analysis), parity_section(parity), gallery_section(gallery)])
    return page(title, body)


def sweep_index_html(title: str, rows: Sequence[Mapping], pages: Sequence[tuple[str, str]],
                     throughput_png: bytes | None = None, knee: Mapping | None = None) -> str:
    """The sweep's summary page: its table, the throughput plot, a link to each batch size's page.

    ``rows``: summary.json's rows (one dict per batch size); ``pages``: (label, relative
    href), e.g. ("bs 16", "bs16/report.html"); ``knee``: summary.json's knee.
    """
    columns = list(dict.fromkeys(k for row in rows for k in row))
    body = "<h2>Batch sizes</h2>" + table(columns, [[row.get(c) for c in columns] for row in rows], left=0)
    if knee:
        body += f"<p>Knee: {esc(fmt(knee))}</p>"
    if throughput_png:
        body += f'<h2>Throughput</h2><img src="{data_uri(throughput_png)}" alt="throughput against batch size">'
    if any("://" in href or href.startswith("//") for _, href in pages):
        raise ValueError("sweep pages are linked by relative paths: the report goes wherever OUT goes")
    links = "".join(f'<li><a href="{esc(href)}">{esc(label)}</a></li>' for label, href in pages)
    body += f"<h2>Runs</h2><ul>{links}</ul>"
    return page(title, body)
