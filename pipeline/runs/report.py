"""report.html: one self-contained page per run folder, opened from disk with no server.

Images are inlined as base64 data URIs, the table sorts on a header click with a few lines
of plain JavaScript, and nothing is fetched from anywhere (no CDN, no fonts). Every value
is HTML-escaped: class names and paths come from users' folders.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.runs.folder import fmt

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #eee; cursor: pointer; user-select: none; }
th[aria-sort="ascending"]::after { content: " \\25B2"; }
th[aria-sort="descending"]::after { content: " \\25BC"; }
tr.winner td { background: #fff3b0; font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.5em 0; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 0.85em; }
.note { color: #8a5300; }
"""

# Click a header: sort its column, numbers as numbers (empty cells last), again to reverse.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      function key(row) { var t = row.cells[col].textContent.trim(), n = Number(t);
                          return t === "" ? null : (isNaN(n) ? t : n); }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null || y === null) { return x === y ? 0 : (x === null ? 1 : -1); }
        var c = (typeof x === typeof y) ? (x < y ? -1 : x > y ? 1 : 0) : (typeof x === "number" ? -1 : 1);
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def image_tag(path: Path, alt: str) -> str:
    """An <img> holding the file itself (PNG), so the page needs nothing beside it."""
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], mark: str | None = None) -> str:
    """A sortable table; rows whose ``mark`` field is true get class ``winner``."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cls = ' class="winner"' if mark and r.get(mark) else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(fmt(r.get(c)))}</td>" for c in columns) + "</tr>")
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def write_report(
    path: Path,
    title: str,
    sections: Sequence[tuple[str, str]],
    notes: Sequence[str] = (),
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """``path`` (report.html): the title, notes, each (heading, HTML) section, then the
    cache's metadata as JSON."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>\n{body}")
    if meta is not None:
        parts.append("<h2>Cache metadata</h2>\n<pre>" + html.escape(json.dumps(meta, indent=2, default=str)) + "</pre>")
    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(parts) + f"\n<script>{SCRIPT}</script>\n"
        "</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


def images(paths: Sequence[Path]) -> str:
    """Every existing PNG of ``paths`` inline, each captioned with its file name."""
    return "\n".join(
        f"<figure>{image_tag(p, p.stem)}<figcaption>{html.escape(p.name)}</figcaption></figure>"
        for p in paths
        if p.is_file()
    )


def sweep_report(
    run_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    meta: Mapping[str, Any],
    notes: Sequence[str] = (),
    title: str | None = None,
) -> Path:
    """classify: the results table (winner highlighted), the winner's confusion matrix,
    every MLP's learning curves, the cache's metadata."""
    curves = sorted((run_dir / "curves").glob("*.png")) if (run_dir / "curves").is_dir() else []
    sections = [("Results (click a header to sort; the winner is highlighted)", table(rows, columns, mark="winner"))]
    if (run_dir / "confusion.png").is_file():
        sections.append(("Confusion matrix of the winner", images([run_dir / "confusion.png"])))
    if curves:
        sections.append(("Learning curves", images(curves)))
    return write_report(run_dir / "report.html", title or f"featcache sweep {run_dir.name}", sections, notes, meta)


def table_report(
    run_dir: Path,
    kind: str,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    pictures: Sequence[str],
    meta: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
    mark: str | None = None,
) -> Path:
    """compare (the bar chart) and finetune (the curves): a table and the run's pictures."""
    sections = [("Results (click a header to sort)", table(rows, columns, mark=mark))]
    found = [run_dir / p for p in pictures if (run_dir / p).is_file()]
    if found:
        sections.append(("Charts", images(found)))
    return write_report(run_dir / "report.html", f"featcache {kind} {run_dir.name}", sections, notes, meta)
