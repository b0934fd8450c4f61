"""The index job's run report: a one-page HTML file beside the run's resolved config.

    <index.uri>/_runs/<run_id>/config.resolved.yaml
    <index.uri>/_runs/<run_id>/report.html     summary counts, rejects by reason, throughput over time

Self-contained (inline SVG, no scripts, no external resources), so it opens from S3, a laptop or a
CI artifact. The same counters are in the ``runs`` table and the job's printed summary.
"""

from __future__ import annotations

import html
import time
from collections import Counter
from dataclasses import dataclass, field

from pipelines.storage import S3Settings, filesystem_for, join

REPORTS_DIR = "_runs"


@dataclass
class Timeline:
    """Rows finished over time (one point per batch the driver received) and, from the encoder
    side, when each batch of images was encoded (the ``indexed_at`` the actor stamps)."""

    started: float = field(default_factory=time.perf_counter)
    started_wall: float = field(default_factory=time.time)
    points: list[tuple[float, int, int]] = field(default_factory=list)  # (s, rows done, encoded)
    encoded: Counter = field(default_factory=Counter)  # encoder timestamp (epoch s) -> images

    def add(self, rows_done: int, encoded: int) -> None:
        self.points.append((time.perf_counter() - self.started, rows_done, encoded))

    def add_encoded(self, timestamps) -> None:
        """Encoder finish times (epoch seconds), one per image encoded."""
        self.encoded.update(timestamps)

    def encode_curve(self) -> list[tuple[float, int]]:
        """(seconds since the run started, images encoded so far) per encoder batch."""
        total, out = 0, []
        for ts in sorted(self.encoded):
            total += self.encoded[ts]
            out.append((max(0.0, ts - self.started_wall), total))
        return out

    def steady_rate(self) -> float | None:
        """Images encoded per second from the end of the first encoder batch to the end of the
        last: the pipeline's rate once the actors are up and the model is loaded (what
        ``benchmarks/model_throughput.py`` compares with); None with fewer than two encoder batches."""
        curve = self.encode_curve()
        if len(curve) < 2 or curve[-1][0] <= curve[0][0]:
            return None
        return (curve[-1][1] - curve[0][1]) / (curve[-1][0] - curve[0][0])


def _svg_line(
    points: list[tuple[float, float]], width=640, height=220, x_label="", y_label=""
) -> str:
    if not points:
        return "<p>(no batches)</p>"
    xmax = max(p[0] for p in points) or 1.0
    ymax = max(p[1] for p in points) or 1.0
    pad = 40

    def xy(x: float, y: float) -> str:
        return f"{pad + x / xmax * (width - 2 * pad):.1f},{height - pad - y / ymax * (height - 2 * pad):.1f}"

    path = " ".join(xy(x, y) for x, y in [(0.0, 0.0), *points])
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(y_label)}">'
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#888"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#888"/>'
        f'<polyline fill="none" stroke="#2563eb" stroke-width="2" points="{path}"/>'
        f'<text x="{width - pad}" y="{height - 8}" text-anchor="end" font-size="12">'
        f"{html.escape(x_label)} (max {xmax:.1f})</text>"
        f'<text x="4" y="{pad - 10}" font-size="12">{html.escape(y_label)} (max {ymax:,.1f})</text>'
        "</svg>"
    )


def _bars(counts: dict[str, int], width=640) -> str:
    if not counts:
        return "<p>No rows rejected.</p>"
    top = max(counts.values())
    rows = []
    for reason, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        w = max(2, int(n / top * (width - 260)))
        rows.append(
            f"<tr><td>{html.escape(reason)}</td><td style='text-align:right'>{n:,}</td>"
            f"<td><div style='background:#dc2626;height:12px;width:{w}px'></div></td></tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def render_html(summary: dict, timeline: Timeline) -> str:
    """The report page for one run's summary (the dict ``run_index`` returns)."""
    rates = []
    prev_t, prev_enc = 0.0, 0
    for t, enc in timeline.encode_curve():
        if t - prev_t >= 0.5:  # images/s per interval of at least half a second
            rates.append((t, (enc - prev_enc) / (t - prev_t)))
            prev_t, prev_enc = t, enc
    keys = [
        ("publish guard", "status"),  # passed, or held (then the reason below, nothing published)
        ("held back because", "held_reason"),
        ("rows in", "in"),
        ("indexed", "indexed"),
        ("encoded this run", "encoded_this_run"),
        ("resumed from staging", "resumed_from_staging"),
        ("unchanged", "unchanged"),
        ("rejected", "rejected"),
        ("deleted", "deleted"),
        ("seconds", "seconds"),
        ("images/s (encode stream)", "images_per_s"),
        ("images/s (steady, model loaded)", "steady_images_per_s"),
        ("products rows", "products_rows"),
        ("published version", "products_version"),
        ("ANN index", "ann_index"),
        ("driver peak MB", "driver_peak_rss_mb"),
        ("encoder actor peak MB", "worker_peak_rss_mb"),
    ]
    table = "".join(
        f"<tr><th>{html.escape(label)}</th><td>{html.escape(str(summary.get(key)))}</td></tr>"
        for label, key in keys
        if key != "held_reason" or summary.get(key)
    )
    title = f"Index run {summary['run_id']}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;color:#111}} th{{text-align:left;padding-right:1em}}
td,th{{padding:2px 8px}} h2{{margin-top:1.5em}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>model <code>{html.escape(summary["model_id"])}</code>, table
<code>{html.escape(summary["products_table"])}</code>; configuration: <a href="config.resolved.yaml">config.resolved.yaml</a></p>
<table>{table}</table>
<h2>Rejected rows by reason</h2>
{_bars(summary.get("rejected_by_reason") or {})}
<h2>Throughput over time</h2>
{_svg_line([(t, done) for t, done, _ in timeline.points], x_label="seconds", y_label="rows finished")}
{_svg_line(rates, x_label="seconds", y_label="images encoded per second")}
</body></html>
"""


def write_run_report(
    index_uri: str, s3: S3Settings | None, summary: dict, timeline: Timeline, resolved_config: str
) -> str:
    """Write ``config.resolved.yaml`` and ``report.html`` under ``<index>/_runs/<run_id>/``;
    returns the report's path or URI."""
    folder = join(index_uri, REPORTS_DIR, summary["run_id"])
    fs, root = filesystem_for(folder, s3)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(join(root, "config.resolved.yaml")) as f:
        f.write(resolved_config.encode())
    with fs.open_output_stream(join(root, "report.html")) as f:
        f.write(render_html(summary, timeline).encode())
    return join(folder, "report.html")
