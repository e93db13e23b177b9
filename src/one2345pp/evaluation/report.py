"""Evaluation reports: per-object rows -> ``metrics.csv``, ``metrics.json``, ``report.md`` and ``report.html``.

A row is a dict with

- ``uid`` (non-empty, unique), ``status`` (``"ok"`` or ``"failed"``), ``reason`` (why it failed; required then);
- the metrics, each a number or ``None`` (not measured): ``fscore`` (fraction in [0, 1], F-Score at 0.05),
  ``chamfer`` (>= 0, unit box), ``clip`` (mean cosine similarity in [-1, 1]), ``psnr`` (dB), ``lpips`` (>= 0),
  ``mask_iou`` (in [0, 1]) and ``seconds`` (pipeline time, >= 0);
- image paths, shown in the HTML page: ``input_image``, ``views_image`` (the 3x2 view grid), ``turntable_image`` and
  any other key ending in ``_image``. Absolute paths are written relative to the output folder, relative ones are
  taken as relative to it already; the page references them and embeds nothing;
- any other keys (kept in the JSON; scalars get a CSV column, lists / dicts are JSON-encoded there).

Means are taken over the successful (``ok``) objects, per column over the values that are finite numbers (``None``,
NaN and infinities - e.g. the PSNR of two identical images - are left out of the mean, written as ``null`` in the
JSON and empty in the CSV). Failed objects are listed with their reason and counted. The Markdown and HTML tables put
our means next to the published GSO numbers of METHOD.md (F-Score and CLIP similarity printed x 100 as in the paper).
Metrics that were not measured at all (``unavailable``: metric -> reason, e.g. no CLIP model configured) are printed
as "n/a" with the reason beside the tables and kept in the JSON.
Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from numbers import Real
from pathlib import Path
from urllib.parse import quote

from ..utils.atomic import write_text

__all__ = [
    "FILES",
    "IMAGE_KEYS",
    "METRICS",
    "PUBLISHED",
    "Published",
    "normalize_rows",
    "read_metrics",
    "render_csv",
    "render_html",
    "render_markdown",
    "summarize",
    "write_report",
]

METRICS = ("fscore", "chamfer", "clip", "psnr", "lpips", "mask_iou", "seconds")
IMAGE_KEYS = ("input_image", "views_image", "turntable_image")
STATUSES = ("ok", "failed")
FILES = {"csv": "metrics.csv", "json": "metrics.json", "markdown": "report.md", "html": "report.html"}
_RANGES = {
    "fscore": (0.0, 1.0),
    "chamfer": (0.0, math.inf),
    "clip": (-1.0, 1.0),
    "lpips": (0.0, math.inf),
    "mask_iou": (0.0, 1.0),
    "seconds": (0.0, math.inf),
}


@dataclass(frozen=True)
class Published:
    """One method's published GSO numbers (METHOD.md); F-Score and CLIP similarity in percent as in the paper."""

    method: str
    fscore: float | None = None
    clip: float | None = None
    time: str | None = None
    chamfer: float | None = None
    psnr: float | None = None
    lpips: float | None = None
    mask_iou: float | None = None


PUBLISHED = (
    Published("One-2-3-45++", 93.6, 81.0, "60 s", chamfer=0.039, psnr=22.12, lpips=0.110, mask_iou=0.878),
    Published("One-2-3-45++ without texture refinement", 93.6, 73.4, "20 s"),
    Published("Shap-E", 91.8, 73.1, "27 s"),
    Published("Zero123-XL+SDS", 91.6, 73.1, "30 min"),
    Published("One-2-3-45", 90.4, 70.8, "45 s"),
    Published("SyncDreamer", 84.8, 68.9, "6 min"),
    Published("DreamGaussian", 81.0, 68.4, "2 min"),
)
PUBLISHED_NOTES = (
    "Published numbers: Google Scanned Objects, all 1,030 objects, one frontal input view (METHOD.md).",
    "One-2-3-45++ Chamfer distance from a later report; its PSNR / LPIPS / mask IoU are those of the multi-view stage "
    "(six generated views against ground-truth renderings).",
)
# (key, header, scale for display, decimals)
_TABLE = (
    ("fscore", "F-Score (%) ↑", 100.0, 1),
    ("chamfer", "Chamfer ↓", 1.0, 3),
    ("clip", "CLIP-sim (%) ↑", 100.0, 1),
    ("seconds", "Time", 1.0, 1),
    ("psnr", "PSNR (dB) ↑", 1.0, 2),
    ("lpips", "LPIPS ↓", 1.0, 3),
    ("mask_iou", "Mask IoU ↑", 1.0, 3),
)
_DASH = "—"
_NA = "n/a"
_HEADERS = {key: header for key, header, _, _ in _TABLE}


# --------------------------------------------------------------------------------------------------------- rows
def _is_number(v) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool)


def _finite(v) -> bool:
    return _is_number(v) and math.isfinite(float(v))


def _image_keys(row: Mapping) -> list[str]:
    extra = sorted(k for k in row if k.endswith("_image") and k not in IMAGE_KEYS)
    return [*IMAGE_KEYS, *extra]


def _relative(path, out_dir: Path) -> str | None:
    if path is None or str(path) == "":
        return None
    p = Path(path)
    if p.is_absolute():
        return Path(os.path.relpath(p, out_dir.resolve())).as_posix()
    return p.as_posix()


def normalize_rows(rows: Sequence[Mapping], out_dir: str | os.PathLike = ".") -> list[dict]:
    """Checked copies of ``rows`` (see the module doc) with every metric key present, numbers as floats and image
    paths relative to ``out_dir``. A missing / duplicate uid, an unknown status, a failed row without a reason or a
    metric that is not a number or out of its range is an error naming the object and the key."""
    out_dir = Path(out_dir)
    seen, out = set(), []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"row {i} is a {type(row).__name__}, expected a dict")
        uid = row.get("uid")
        if not isinstance(uid, str) or not uid:
            raise ValueError(f"row {i}: 'uid' must be a non-empty string, got {uid!r}")
        if uid in seen:
            raise ValueError(f"duplicate uid {uid!r} in the evaluation rows")
        seen.add(uid)
        status = row.get("status", "ok")
        if status not in STATUSES:
            raise ValueError(f"object {uid!r}: status must be one of {STATUSES}, got {status!r}")
        reason = row.get("reason") or None
        if status == "failed" and not reason:
            raise ValueError(f"object {uid!r} failed without a 'reason'")
        r = {"uid": uid, "status": status, "reason": None if reason is None else str(reason)}
        for key in METRICS:
            v = row.get(key)
            if v is not None and not _is_number(v):
                raise ValueError(f"object {uid!r}: {key} must be a number or None, got {v!r}")
            v = None if v is None else float(v)
            if v is not None and key in _RANGES and math.isfinite(v):
                lo, hi = _RANGES[key]
                if not lo - 1e-9 <= v <= hi + 1e-9:
                    raise ValueError(f"object {uid!r}: {key}={v} is outside [{lo}, {hi}]")
            r[key] = v
        for key in _image_keys(row):
            r[key] = _relative(row.get(key), out_dir)
        for key, v in row.items():
            if key not in r:
                r[key] = v
        out.append(r)
    return out


def _mean_keys(rows: Sequence[Mapping]) -> list[str]:
    extra = []
    for key in _columns(rows):
        if key in METRICS or key in ("uid", "status", "reason") or key.endswith("_image"):
            continue
        values = [r.get(key) for r in rows if r["status"] == "ok"]
        if values and all(v is None or _is_number(v) for v in values) and any(_is_number(v) for v in values):
            extra.append(key)
    return [*METRICS, *extra]


def summarize(rows: Sequence[Mapping]) -> dict:
    """Counts and per-column means over the successful objects of normalised rows (finite values only)."""
    ok = [r for r in rows if r["status"] == "ok"]
    mean, n = {}, {}
    for key in _mean_keys(rows):
        vals = [float(r[key]) for r in ok if _finite(r.get(key))]
        mean[key] = sum(vals) / len(vals) if vals else None
        n[key] = len(vals)
    return {
        "count": len(rows),
        "succeeded": len(ok),
        "failed": len(rows) - len(ok),
        "mean": mean,
        "n": n,
        "failures": [{"uid": r["uid"], "reason": r["reason"]} for r in rows if r["status"] == "failed"],
    }


# ------------------------------------------------------------------------------------------------------ writing
def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Mapping):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    if isinstance(v, Path):
        return v.as_posix()
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        return _json_value(v.item())
    return v


def _csv_value(v) -> str:
    v = _json_value(v)
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _columns(rows: Sequence[Mapping]) -> list[str]:
    cols = ["uid", "status", *METRICS, "reason"]
    images: list[str] = []
    extra: list[str] = []
    for r in rows:
        for k in r:
            if k in cols or k in images or k in extra:
                continue
            (images if k.endswith("_image") else extra).append(k)
    return cols + sorted(extra) + [k for k in IMAGE_KEYS if k in images] + sorted(set(images) - set(IMAGE_KEYS))


def _write_text(path: Path, text: str) -> Path:
    return write_text(path, text, newline="")  # no newline translation: the CSV holds its own line ends


def render_csv(rows: Sequence[Mapping]) -> str:
    buf = io.StringIO()
    cols = _columns(rows)
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: _csv_value(r.get(c)) for c in cols})
    return buf.getvalue()


def _fmt(v, scale: float = 1.0, decimals: int = 3) -> str:
    return f"{float(v) * scale:.{decimals}f}" if _finite(v) else _DASH


def _fmt_seconds(v) -> str:
    return f"{float(v):.1f} s" if _finite(v) else _DASH


def _summary_cells(summary: Mapping, unavailable: Mapping[str, str] | None = None) -> list[str]:
    unavailable = unavailable or {}
    cells = []
    for key, _, scale, dec in _TABLE:
        v = summary["mean"].get(key)
        if key in unavailable:
            cells.append(_NA)
        else:
            cells.append(_fmt_seconds(v) if key == "seconds" else _fmt(v, scale, dec))
    return cells


def _unavailable_notes(unavailable: Mapping[str, str]) -> list[str]:
    return [f"{_HEADERS.get(k, k)}: not available ({reason})." for k, reason in unavailable.items()]


def _check_unavailable(unavailable: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(unavailable or {})
    for key, reason in out.items():
        if key not in METRICS:
            raise ValueError(f"unavailable: unknown metric {key!r}; metrics are {METRICS}")
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"unavailable: metric {key!r} needs a reason (a non-empty string), got {reason!r}")
    return out


def _published_cells(p: Published) -> list[str]:
    cells = []
    for key, _, _, dec in _TABLE:
        if key == "seconds":
            cells.append(p.time or _DASH)
            continue
        v = getattr(p, key)
        cells.append(_DASH if v is None else f"{v:.{dec}f}")
    return cells


def _ours_label(dataset: str, summary: Mapping) -> str:
    return f"Ours ({dataset}, {summary['succeeded']} of {summary['count']} objects)"


def _object_cells(r: Mapping, unavailable: Mapping[str, str] | None = None) -> list[str]:
    unavailable = unavailable or {}
    return [
        _NA if k in unavailable else _fmt_seconds(r.get(k)) if k == "seconds" else _fmt(r.get(k), s, d)
        for k, _, s, d in _TABLE
    ]


def _md_cell(text) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def render_markdown(
    rows: Sequence[Mapping], summary: Mapping, *, title: str, dataset: str, unavailable: Mapping[str, str] | None = None
) -> str:
    unavailable = _check_unavailable(unavailable)
    headers = [h for _, h, _, _ in _TABLE]
    lines = [f"# {title}", ""]
    lines.append(
        f"Dataset: {_md_cell(dataset)}. {summary['count']} objects, {summary['succeeded']} succeeded, "
        f"{summary['failed']} failed (failed objects are left out of the means)."
    )
    lines += ["", "## Summary", "", "| Method | " + " | ".join(headers) + " |", "|---" * (len(headers) + 1) + "|"]
    ours = _summary_cells(summary, unavailable)
    lines.append(f"| **{_md_cell(_ours_label(dataset, summary))}** | " + " | ".join(ours) + " |")
    for p in PUBLISHED:
        lines.append(f"| {_md_cell(p.method)} (published) | " + " | ".join(_published_cells(p)) + " |")
    lines.append("")
    lines += [f"- {note}" for note in PUBLISHED_NOTES]
    if dataset.lower() != "gso":
        lines.append(f"- Our numbers are on the {_md_cell(dataset)} set, not GSO: compare with care.")
    lines += [f"- {_md_cell(note)}" for note in _unavailable_notes(unavailable)]
    lines += ["", "## Per object", "", "| uid | status | " + " | ".join(headers) + " | reason |"]
    lines.append("|---" * (len(headers) + 3) + "|")
    for r in rows:
        cells = [_md_cell(r["uid"]), r["status"], *_object_cells(r, unavailable), _md_cell(r.get("reason") or "")]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["failed"]:
        lines += ["", "## Failures", ""]
        lines += [f"- `{_md_cell(f['uid'])}`: {_md_cell(f['reason'])}" for f in summary["failures"]]
    return "\n".join(lines) + "\n"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
tr.ours td { font-weight: bold; background: #eef6ee; }
tr.failed td { background: #fbeaea; }
td.reason { color: #a00; text-align: left; max-width: 30em; }
td.images { text-align: left; }
td.images img { height: 160px; margin: 2px; border: 1px solid #ddd; background: #fff; }
figure { display: inline-block; margin: 0 4px; }
figcaption { font-size: 0.8em; color: #666; text-align: center; }
.note { color: #555; font-size: 0.9em; }
"""


def _img(src: str, caption: str) -> str:
    s = html.escape(quote(src, safe="/:._-~"))
    c = html.escape(caption)
    return f'<figure><a href="{s}"><img src="{s}" alt="{c}" loading="lazy"></a><figcaption>{c}</figcaption></figure>'


def render_html(
    rows: Sequence[Mapping],
    summary: Mapping,
    *,
    title: str,
    dataset: str,
    settings=None,
    unavailable: Mapping[str, str] | None = None,
) -> str:
    unavailable = _check_unavailable(unavailable)
    e = html.escape
    headers = "".join(f"<th>{e(h)}</th>" for _, h, _, _ in _TABLE)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>Dataset: {e(dataset)}. {summary['count']} objects, {summary['succeeded']} succeeded, "
        f"{summary['failed']} failed (failed objects are left out of the means).</p>",
        "<h2>Summary</h2>",
        f'<table id="summary"><tr><th>Method</th>{headers}</tr>',
        f'<tr class="ours"><td>{e(_ours_label(dataset, summary))}</td>'
        + "".join(f"<td>{e(c)}</td>" for c in _summary_cells(summary, unavailable))
        + "</tr>",
    ]
    for p in PUBLISHED:
        out.append(f"<tr><td>{e(p.method)} (published)</td>" + "".join(f"<td>{e(c)}</td>" for c in _published_cells(p)))
        out[-1] += "</tr>"
    out.append("</table>")
    notes = list(PUBLISHED_NOTES)
    if dataset.lower() != "gso":
        notes.append(f"Our numbers are on the {dataset} set, not GSO: compare with care.")
    notes += _unavailable_notes(unavailable)
    out += [f'<p class="note">{e(n)}</p>' for n in notes]
    out += [
        "<h2>Per object</h2>",
        f'<table id="objects"><tr><th>uid</th><th>status</th>{headers}<th>reason</th><th>images</th></tr>',
    ]
    for r in rows:
        cls = "failed" if r["status"] == "failed" else "ok"
        cells = "".join(f"<td>{e(c)}</td>" for c in _object_cells(r, unavailable))
        figs = "".join(_img(r[k], k.removesuffix("_image")) for k in _image_keys(r) if r.get(k))
        out.append(
            f'<tr class="{cls}"><td>{e(r["uid"])}</td><td>{e(r["status"])}</td>{cells}'
            f'<td class="reason">{e(r.get("reason") or "")}</td><td class="images">{figs}</td></tr>'
        )
    out.append("</table>")
    if settings:
        out += ["<h2>Settings</h2>", f"<pre>{e(json.dumps(_json_value(settings), indent=2, sort_keys=True))}</pre>"]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(
    rows: Sequence[Mapping],
    out_dir: str | os.PathLike,
    *,
    dataset: str = "gso",
    title: str = "One-2-3-45++ evaluation",
    settings: Mapping | None = None,
    unavailable: Mapping[str, str] | None = None,
) -> dict[str, Path]:
    """Write ``metrics.csv``, ``metrics.json``, ``report.md`` and ``report.html`` into ``out_dir`` (each atomically)
    and return their paths by kind (``csv``, ``json``, ``markdown``, ``html``). ``settings`` (e.g. the resolved
    eval config) is stored in the JSON and shown in the HTML page. ``unavailable`` maps metrics that were not
    measured to the reason (e.g. no CLIP model configured): stored in the JSON, printed as "n/a" with the reason in
    the Markdown and HTML tables."""
    unavailable = _check_unavailable(unavailable)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    norm = normalize_rows(rows, out_dir)
    summary = summarize(norm)
    payload = {
        "title": title,
        "dataset": dataset,
        **{k: summary[k] for k in ("count", "succeeded", "failed", "mean", "n", "failures")},
        "published": [asdict(p) for p in PUBLISHED],
        "settings": _json_value(dict(settings)) if settings else {},
        "unavailable": unavailable,
        "objects": [_json_value(r) for r in norm],
    }
    paths = {kind: out_dir / name for kind, name in FILES.items()}
    _write_text(paths["csv"], render_csv(norm))
    _write_text(paths["json"], json.dumps(_json_value(payload), indent=2, allow_nan=False) + "\n")
    md = render_markdown(norm, summary, title=title, dataset=dataset, unavailable=unavailable)
    _write_text(paths["markdown"], md)
    page = render_html(norm, summary, title=title, dataset=dataset, settings=settings, unavailable=unavailable)
    _write_text(paths["html"], page)
    return paths


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The per-object rows of a ``metrics.json`` (or of the one in a folder), e.g. to resume a partial evaluation."""
    path = Path(path)
    if path.is_dir():
        path = path / FILES["json"]
    if not path.is_file():
        raise FileNotFoundError(f"evaluation metrics not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    objects = data.get("objects") if isinstance(data, dict) else None
    if not isinstance(objects, list):
        raise ValueError(f"{path}: no 'objects' list (not a metrics.json written by one2345pp)")
    return objects
