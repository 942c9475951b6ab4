"""inspect.html: what ``featcache inspect`` found, on one self-contained page (report.html's
style and sortable tables): each flagged image beside its partner (the near-copy, the
nearest train image of the suggested class, the nearest train image) as inline JPEG
thumbnails, the map, and every flagged row in a table.

Thumbnails are read from the cache's data root (its metadata names it; cached paths are
relative to it). A root that is gone, or arrays with no files behind them, give a page
without pictures and a note saying why, never an error.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.runs import report

THUMB_PIXELS = 128  # longest side of a thumbnail
TABLE_ROWS = 500  # flagged rows per table on the page (the CSVs hold all)

GALLERY_STYLE = """
<style>
.pairs { display: flex; flex-wrap: wrap; gap: 0.8em; }
.pair { border: 1px solid #ccc; padding: 0.4em; font-size: 0.8em; max-width: 300px; }
.pair figure { display: inline-block; margin: 0 0.2em; text-align: center; vertical-align: top; }
.pair img { width: 128px; height: 128px; object-fit: contain; margin: 0; }
.pair .missing { display: inline-block; width: 128px; height: 128px; background: #eee; color: #888; }
.pair figcaption { width: 128px; overflow-wrap: anywhere; }
</style>
"""


def thumbnail(root: Path | None, rel_path: str) -> str | None:
    """A data URI of ``root/rel_path`` shrunk to THUMB_PIXELS (JPEG), or None when it cannot be read."""
    if root is None:
        return None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(root / rel_path) as img:
            img.thumbnail((THUMB_PIXELS, THUMB_PIXELS))
            buffer = io.BytesIO()
            img.convert("RGB").save(buffer, format="JPEG", quality=85)
    except (OSError, UnidentifiedImageError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(root: Path | None, path: str, caption: str) -> str:
    uri = thumbnail(root, path)
    picture = (
        f'<img src="{uri}" alt="{html.escape(path)}" title="{html.escape(path)}">'
        if uri
        else f'<span class="missing" title="{html.escape(path)}">no image</span>'
    )
    return f"<figure>{picture}<figcaption>{html.escape(caption)}</figcaption></figure>"


def gallery(root: Path | None, rows: Sequence[Mapping[str, Any]], finding: str, show: int) -> str:
    """The first ``show`` rows: the flagged image and its partner side by side."""
    cards = []
    for r in rows[:show]:
        left = _figure(root, r["path"], f"{r['split']} · {r['class']} · {r['path']}")
        right = (
            _figure(root, r["partner"], f"{r['partner_split']} · {r['partner_class']} · {r['partner']}")
            if r.get("partner")
            else ""
        )
        detail = f"score {report.fmt(r['score'])}" + (f" · suggested: {r['suggested']}" if r.get("suggested") else "")
        cards.append(f'<div class="pair" data-finding="{finding}">{left}{right}<div>{html.escape(detail)}</div></div>')
    return f'<div class="pairs">{"".join(cards)}</div>' if cards else "<p>Nothing flagged.</p>"


def thumbnail_root(value: Any) -> tuple[Path | None, str | None]:
    """The folder thumbnails are read from, or None and the reason there are none."""
    if not value:
        return None, "no thumbnails: the cache does not name its data folder"
    root = Path(str(value))
    if not root.is_dir():
        return None, f"no thumbnails: the cache's data {str(root)!r} is not a folder here (arrays, or moved)"
    return root, None


def write_inspect_page(
    run_dir: Path,
    title: str,
    *,
    data_root: Any,
    findings: Mapping[str, Sequence[Mapping[str, Any]]],
    scores: Mapping[str, str],
    columns: Sequence[str],
    map_png: Path,
    counts: Mapping[str, int],
    notes: Sequence[str],
    meta: Mapping[str, Any],
    show: int,
) -> Path:
    """``run_dir/inspect.html``: counts, the map, then per finding a gallery and a table."""
    root, why = thumbnail_root(data_root)
    summary = report.table(
        [{"finding": name, "flagged": n, "csv": f"{name}.csv"} for name, n in counts.items()],
        ["finding", "flagged", "csv"],
    )
    sections = [("Findings", GALLERY_STYLE + summary), ("Map of the embedding", report.images([map_png]))]
    for name, rows in findings.items():
        heading = f"{name.replace('_', ' ')}: {len(rows)} flagged (score: {scores[name]})"
        shown = f"<p>The first {min(show, len(rows))} of {len(rows)}, most suspicious first:</p>" if rows else ""
        table = report.table(rows[:TABLE_ROWS], columns) if rows else ""
        more = f"<p>The table shows {TABLE_ROWS}; {name}.csv has all {len(rows)}.</p>" if len(rows) > TABLE_ROWS else ""
        sections.append((heading, shown + gallery(root, rows, name, show) + table + more))
    return report.write_report(
        run_dir / "inspect.html", title, sections, [*notes, *([why] if why else [])], meta
    )


__all__ = ["gallery", "thumbnail", "thumbnail_root", "write_inspect_page"]
