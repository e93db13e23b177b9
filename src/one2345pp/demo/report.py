"""``OUT/index.html``: one page over everything the demo made. It references files (relative links, nothing
embedded) and only files that exist; what is missing says so with the step that failed."""

from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from urllib.parse import quote

from ..utils.atomic import write_text
from .config import STAGE_NAMES, DemoConfig
from .steps import DemoState, load_average, training_metrics

INDEX_FILE = "index.html"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
td.num { text-align: right; }
tr.failed td { background: #fbeaea; }
img { border: 1px solid #ddd; background: #fff; }
img.views { height: 192px; } img.input { height: 128px; } img.turntable { height: 128px; }
img.sheet { max-width: 100%; }
pre { margin: 0; white-space: pre-wrap; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
"""

_EVAL_COLUMNS = (
    ("fscore", "F-Score@0.05 ↑", "{:.3f}"),
    ("chamfer", "Chamfer ↓", "{:.4f}"),
    ("psnr", "PSNR (dB) ↑", "{:.2f}"),
    ("mask_iou", "mask IoU ↑", "{:.3f}"),
    ("seconds", "pipeline s", "{:.1f}"),
)
_EVAL_IMAGES = (
    ("input_image", "input"),
    ("views_image", "views"),
    ("gt_views_image", "views"),
    ("turntable_image", "turntable"),
)

e = html.escape


def _href(path: str) -> str:
    return e(quote(path, safe="/:._-~"))


def _img(out: Path, rel: str, cls: str, alt: str) -> str:
    if not (out / rel).is_file():
        return f"<em>not made: {e(rel)}</em>"
    return f'<a href="{_href(rel)}"><img class="{cls}" src="{_href(rel)}" alt="{e(alt)}" title="{e(alt)}"></a>'


def _link(out: Path, rel: str, text: str | None = None) -> str:
    if not (out / rel).exists():
        return f"<em>not made: {e(rel)}</em>"
    return f'<a href="{_href(rel)}">{e(text or rel)}</a>'


def _fmt(v, spec: str) -> str:
    return "—" if v is None else spec.format(v)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _steps_table(out: Path, state: DemoState) -> list[str]:
    rows = [
        "<table><tr><th>step</th><th>status</th><th>seconds</th><th>CPU seconds</th><th>load (1, 5, 15 min)</th>"
        "<th>summary</th>"
        "<th>log</th></tr>"
    ]
    for name, rec in state.data["steps"].items():
        summary = rec.get("summary") or ""
        if rec.get("tail"):
            summary += "\n" + "\n".join(rec["tail"])
        log = f"logs/{name}.log"
        rows.append(
            f'<tr class="{"ok" if rec.get("status") == "done" else "failed"}"><td>{e(name)}</td>'
            f'<td>{e(str(rec.get("status")))}</td><td class="num">{_fmt(rec.get("seconds"), "{:.1f}")}</td>'
            f'<td class="num">{_fmt(rec.get("cpu_seconds"), "{:.1f}")}</td>'
            f"<td>{e(str(rec.get('load')))}</td><td><pre>{e(summary)}</pre></td>"
            f"<td>{_link(out, log, 'log') if (out / log).is_file() else ''}</td></tr>"
        )
    for phase, secs in state.data.get("phases", {}).items():
        rows.append(
            f'<tr><td colspan="2"><b>{e(phase)}</b> (wall-clock)</td><td class="num">{secs:.1f}</td>'
            '<td colspan="4"></td></tr>'
        )
    rows.append("</table>")
    return rows


def _stages_table(out: Path, state: DemoState, run_name: str) -> list[str]:
    rows = ["<table><tr><th>stage</th><th>summary</th><th>run</th><th>latest validation media</th></tr>"]
    for name in STAGE_NAMES:
        run = f"checkpoints/{name}/{run_name}"
        rec = state.step(f"train-{name}") or {}
        media = sorted((out / run / "media").glob("*/step*.png"))
        shown = "".join(
            _img(out, m.relative_to(out).as_posix(), "views", f"{m.parent.name}/{m.name}") for m in media[-1:]
        )
        rows.append(
            f"<tr><td>{name}</td><td>{e(rec.get('summary') or '')}</td>"
            f"<td>{_link(out, run + '/config.yaml', 'config.yaml')}<br>{_link(out, run + '/export', 'export/')}</td>"
            f"<td>{shown}</td></tr>"
        )
    rows.append("</table>")
    return rows


def _models_note(cfg: DemoConfig) -> str:
    """Which models the demo trained here and which came shipped with the repository."""
    shipped = {n: getattr(cfg.train, n).pretrained for n in STAGE_NAMES if getattr(cfg.train, n).pretrained}
    trained = [n for n in STAGE_NAMES if n not in shipped]
    text = (
        f"The {', '.join(trained)} model{'s' if len(trained) > 1 else ''} here {'were' if len(trained) > 1 else 'was'} "
        "trained from scratch in minutes on a CPU with the tiny presets (64 px views, 32^3 / 64^3 volumes)"
        if trained
        else "No model was trained here"
    )
    for name, folder in shipped.items():
        text += (
            f"; the {name} model is the tiny one shipped in {folder} (trained from random weights on this machine "
            f"type by `make ship-multiview`, see {folder}/MODEL_CARD.md; `one2345pp demo --from-scratch` trains it "
            "here instead)"
        )
    return f'<p class="note">{e(text)}. A check that the whole chain works and learns, not the paper\'s quality.</p>'


def _condition_note(out: Path, run_name: str) -> list[str]:
    """What the multi-view run's last ``val/cond_gain`` says about the generated views (nothing when not logged)."""
    gain = training_metrics(out / "checkpoints" / "multiview" / run_name).get("val/cond_gain")
    if gain is None:
        return []
    if gain < 0.05:
        verdict = (
            "it hardly follows its input yet (at this size and budget it learns the views' layout first), so the "
            "generated views, and the meshes made from them, come out alike for every input. The last section "
            "shows what the 3D stages do with the right views"
        )
    else:
        verdict = "the condition explains that share of the loss"
    return [
        f'<p class="note">Multi-view model: val/cond_gain {gain:.3f} in its last validation (the relative loss '
        f"increase when each object gets another object's condition; 0: the condition is ignored): {e(verdict)}.</p>"
    ]


def _images_table(out: Path, images: list[dict]) -> list[str]:
    rows = [
        "<table><tr><th>object</th><th>input</th><th>ground-truth views</th><th>generated views</th>"
        "<th>turntable of the mesh</th><th>mesh</th></tr>"
    ]
    for im in images:
        folder = f"infer/{Path(im['input']).stem}"
        result = _read_json(out / folder / "result.json")
        if result.get("status") == "ok":
            mesh = result.get("mesh", {})
            secs = (result.get("timings") or {}).get("total")
            cell = (
                f"{_link(out, folder + '/mesh.glb', 'mesh.glb')}<br>{mesh.get('faces')} faces"
                f"{', textured' if mesh.get('textured') else ''}<br>{_fmt(secs, '{:.1f}')} s<br>"
                f"{_link(out, folder + '/result.json', 'result.json')}"
            )
            views = _img(out, folder + "/views.png", "views", "generated views")
            turn = _img(out, folder + "/turntable.png", "turntable", "turntable")
        else:
            cell, views, turn = f"<em>{e(result.get('reason') or 'not made (see the infer step)')}</em>", "", ""
        rows.append(
            f"<tr><td>{e(im['name'])}<br>azimuth {im['azimuth_deg']:.0f}°, elevation {im['elevation_deg']:.0f}°</td>"
            f"<td>{_img(out, im['input'], 'input', 'input')}</td>"
            f"<td>{_img(out, im['gt_views'], 'views', 'ground truth')}</td><td>{views}</td><td>{turn}</td>"
            f"<td>{cell}</td></tr>"
        )
    rows.append("</table>")
    return rows


def _eval_section(out: Path) -> list[str]:
    m = _read_json(out / "eval" / "metrics.json")
    if not m:
        return ["<p><em>no evaluation (see the eval step above)</em></p>"]
    seed = (((m.get("settings") or {}).get("config") or {}).get("procedural") or {}).get("seed")
    mean = m.get("mean") or {}
    rows = [
        f"<p>{m.get('succeeded')} of {m.get('count')} held-out procedural objects (seed {e(str(seed))}; the training "
        f"data use seed 0), scored by <code>one2345pp eval --dataset procedural</code>: "
        f"{_link(out, 'eval/report.html', 'report.html')}, {_link(out, 'eval/metrics.csv', 'metrics.csv')}, "
        f"{_link(out, 'eval/metrics.json', 'metrics.json')}.</p>",
        *_table_start(_EVAL_COLUMNS, mean, ["input | generated views | ground truth | turntable"]),
    ]
    for row in m.get("objects", []):
        ims = " ".join(
            _img(out, f"eval/{row[k]}", cls, k.removesuffix("_image")) for k, cls in _EVAL_IMAGES if row.get(k)
        )
        reason = f"<br><em>{e(row['reason'])}</em>" if row.get("reason") else ""
        rows.append(
            f'<tr class="{"ok" if row.get("status") == "ok" else "failed"}"><td>{e(row["uid"])}{reason}</td>'
            + "".join(f'<td class="num">{_fmt(row.get(k), f)}</td>' for k, _, f in _EVAL_COLUMNS)
            + f"<td>{ims}</td></tr>"
        )
    rows.append("</table>")
    rows += [f'<p class="note">{e(k)}: not measured ({e(r)}).</p>' for k, r in (m.get("unavailable") or {}).items()]
    return rows


def _table_start(cols, mean: dict, extra: list[str]) -> list[str]:
    """A metrics table's opening, header and mean rows: object, one column per ``(key, heading, format)`` of
    ``cols``, then the ``extra`` headings (left empty in the mean row)."""
    span = f' colspan="{len(extra)}"' if len(extra) > 1 else ""
    return [
        "<table><tr><th>object</th>"
        + "".join(f"<th>{e(h)}</th>" for _, h, _ in cols)
        + "".join(f"<th>{e(h)}</th>" for h in extra)
        + "</tr>",
        "<tr><td><b>mean</b></td>"
        + "".join(f'<td class="num"><b>{_fmt(mean.get(k), f)}</b></td>' for k, _, f in cols)
        + f"<td{span}></td></tr>",
    ]


def _recon_section(out: Path, images: list[dict]) -> list[str]:
    m = _read_json(out / "recon" / "metrics.json")
    if not m:
        return ["<p><em>not made (see the recon step above)</em></p>"]
    gt = {im["name"]: im["gt_views"] for im in images}
    mean = m.get("mean") or {}
    cols = (
        ("iou", "shell IoU ↑", "{:.3f}"),
        ("fscore", "F-Score@0.05 ↑", "{:.3f}"),
        ("chamfer", "Chamfer ↓", "{:.4f}"),
        ("sphere_fscore", "sphere F-Score", "{:.3f}"),
        ("sphere_chamfer", "sphere Chamfer", "{:.4f}"),
    )
    rows = [
        '<p class="note">The coarse and fine stages alone, fed the ground-truth six views of the held-out objects '
        "instead of generated ones: what they learned, apart from the multi-view stage. Metrics in the shards' "
        f"normalised frame ({m.get('points')} surface samples, no alignment); the sphere (radius "
        f"{_fmt(m.get('sphere_radius'), '{:.3f}')}, the training objects' mean shell radius) is a baseline that "
        f"ignores the input. {_link(out, 'recon/metrics.json', 'metrics.json')}.</p>",
        *_table_start(cols, mean, ["ground-truth views (input)", "turntable of the mesh", "mesh"]),
    ]
    for row in m.get("objects", []):
        uid = row["uid"]
        views = _img(out, gt[uid], "views", "ground truth") if uid in gt else ""
        turn = _img(out, f"recon/{row['turntable']}", "turntable", "turntable") if row.get("turntable") else ""
        mesh = _link(out, f"recon/{row['mesh']}", "mesh.glb") if row.get("mesh") else e(row.get("error") or "")
        rows.append(
            f"<tr><td>{e(uid)}</td>"
            + "".join(f'<td class="num">{_fmt(row.get(k), f)}</td>' for k, _, f in cols)
            + f"<td>{views}</td><td>{turn}</td><td>{mesh}</td></tr>"
        )
    rows.append("</table>")
    return rows


def write_index(
    out: Path, cfg: DemoConfig, state: DemoState, images: list[dict], seconds: float, run_name: str
) -> Path:
    """Write ``OUT/index.html`` (temporary name, renamed) and return its path."""
    run = state.data["runs"][-1] if state.data.get("runs") else {}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>One-2-3-45++ demo</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>One-2-3-45++ demo: procedural objects, tiny presets, CPU</h1>",
        f"<p>Written {e(time.strftime('%Y-%m-%d %H:%M'))} on a machine with {os.cpu_count()} CPU cores. This run "
        f"took {seconds:.0f} s wall-clock; steps finished by an earlier run were skipped and show that run's "
        f"seconds. Load average at the start / end of this run: {e(str(run.get('load_start')))} / "
        f"{e(str(load_average()))}.</p>",
        _models_note(cfg),
        "<h2>Steps</h2>",
        *_steps_table(out, state),
        f'<p class="note">Resolved config: {_link(out, "demo_config.yaml")}; step records: '
        f"{_link(out, 'demo.json')}.</p>",
        "<h2>Training data</h2>",
        f"<p>{cfg.data.num_objects} procedural objects: {_link(out, 'data/manifest.jsonl', 'manifest.jsonl')}, "
        f"{_link(out, 'data/config.yaml', 'config.yaml')}. The first of them (condition view | the six target "
        "views | occupancy slices):</p>",
        _img(out, "data/contact_sheet.png", "sheet", "contact sheet"),
        "<h2>Stages</h2>",
        *_stages_table(out, state, run_name),
        "<h2>Held-out images</h2>",
        f'<p class="note">Objects of procedural seed {cfg.images.seed} (not in the training data), rendered as the '
        "shards render a condition view; the ground truth is that condition's six target views. Pipeline: "
        f"{_link(out, 'pipeline/model_index.json', 'pipeline/')}.</p>",
        *_condition_note(out, run_name),
        *_images_table(out, images),
        "<h2>Evaluation</h2>",
        *_eval_section(out),
        "<h2>The 3D stages alone, from ground-truth views</h2>",
        *_recon_section(out, images),
        "</body></html>",
    ]
    return write_text(out / INDEX_FILE, "\n".join(parts) + "\n")
