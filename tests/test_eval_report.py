"""Evaluation report writers: the CSV / JSON parse back to the rows, means ignore failed objects, the Markdown table
holds our means and the published numbers, the HTML page references the images by relative path."""

import csv
import json
import math
from html.parser import HTMLParser
from statistics import mean

import pytest

from one2345pp.evaluation.report import FILES, read_metrics, write_report


def _rows(root):
    rows = []
    for i, (f, ch, clip) in enumerate([(0.91, 0.041, 0.78), (0.95, 0.030, 0.83), (0.88, 0.052, 0.71)]):
        obj = root / "objects" / f"obj{i}"
        rows.append(
            {
                "uid": f"obj{i}",
                "status": "ok",
                "fscore": f,
                "chamfer": ch,
                "clip": clip,
                "psnr": 20.0 + i,
                "lpips": 0.1 + 0.01 * i,
                "mask_iou": 0.85 + 0.01 * i,
                "seconds": 10.0 * (i + 1),
                "input_image": obj / "input.png",  # absolute: written relative to the output folder
                "views_image": str(obj / "views.png"),
                "turntable_image": f"objects/obj{i}/turntable.png",  # already relative
                "precision": 0.9,
            }
        )
    # a failed object carrying partial numbers that must not enter the means
    rows.append(
        {
            "uid": "broken|one",
            "status": "failed",
            "reason": "mesh extraction found no surface",
            "fscore": 0.0,
            "clip": 0.1,
            "seconds": 99.0,
            "input_image": root / "objects/broken/input.png",
        }
    )
    return rows


def test_csv_and_json_parse_back_and_means_ignore_failures(tmp_path):
    rows = _rows(tmp_path)
    paths = write_report(rows, tmp_path, dataset="procedural", settings={"seed": 0, "lpips": "w.safetensors"})
    assert {p.name for p in paths.values()} == set(FILES.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES.values())  # no temp files left

    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["uid"] for r in table] == ["obj0", "obj1", "obj2", "broken|one"]
    for got, want in zip(table[:3], rows[:3]):
        for key in ("fscore", "chamfer", "clip", "psnr", "lpips", "mask_iou", "seconds", "precision"):
            assert float(got[key]) == want[key]
        assert got["status"] == "ok" and got["reason"] == ""
    assert table[3]["status"] == "failed" and table[3]["reason"] == "mesh extraction found no surface"
    assert table[3]["chamfer"] == "" and table[0]["input_image"] == "objects/obj0/input.png"

    data = json.loads(paths["json"].read_text())
    ok = rows[:3]
    assert (data["count"], data["succeeded"], data["failed"]) == (4, 3, 1)
    for key in ("fscore", "chamfer", "clip", "psnr", "lpips", "mask_iou", "seconds", "precision"):
        assert data["mean"][key] == pytest.approx(mean(r[key] for r in ok)), key
        assert data["n"][key] == 3
    assert data["failures"] == [{"uid": "broken|one", "reason": "mesh extraction found no surface"}]
    assert data["settings"] == {"seed": 0, "lpips": "w.safetensors"}
    assert [o["uid"] for o in data["objects"]] == [r["uid"] for r in rows]
    assert data["objects"][1]["views_image"] == "objects/obj1/views.png"
    assert read_metrics(tmp_path) == data["objects"]


def test_markdown_has_ours_next_to_published(tmp_path):
    rows = _rows(tmp_path)
    md = write_report(rows, tmp_path, dataset="gso")["markdown"].read_text()
    ok = rows[:3]
    ours = next(line for line in md.splitlines() if line.startswith("| **Ours"))
    assert "3 of 4 objects" in ours
    for value in (
        f"{100 * mean(r['fscore'] for r in ok):.1f}",
        f"{mean(r['chamfer'] for r in ok):.3f}",
        f"{100 * mean(r['clip'] for r in ok):.1f}",
        f"{mean(r['psnr'] for r in ok):.2f}",
        f"{mean(r['lpips'] for r in ok):.3f}",
        f"{mean(r['mask_iou'] for r in ok):.3f}",
        "20.0 s",
    ):
        assert value in ours, value
    ours_paper = next(line for line in md.splitlines() if line.startswith("| One-2-3-45++ (published)"))
    for value in ("93.6", "81.0", "60 s", "0.039", "22.12", "0.110", "0.878"):
        assert value in ours_paper
    no_refine = next(line for line in md.splitlines() if "without texture refinement" in line)
    assert all(v in no_refine for v in ("93.6", "73.4", "20 s"))
    for method, f, c, t in [
        ("Shap-E", "91.8", "73.1", "27 s"),
        ("Zero123-XL+SDS", "91.6", "73.1", "30 min"),
        ("One-2-3-45 (published)", "90.4", "70.8", "45 s"),
        ("SyncDreamer", "84.8", "68.9", "6 min"),
        ("DreamGaussian", "81.0", "68.4", "2 min"),
    ]:
        line = next(line for line in md.splitlines() if method in line)
        assert all(v in line for v in (f, c, t)), line
    assert "broken\\|one" in md and "mesh extraction found no surface" in md  # failure listed, pipe escaped
    assert "not GSO" not in md
    assert "not GSO" in write_report(rows, tmp_path / "p", dataset="procedural")["markdown"].read_text()


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.external = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a["src"])
        if tag in ("script", "link") or any(str(v).startswith(("http:", "https:")) for v in a.values()):
            self.external.append((tag, a))


def test_html_references_images_relatively_and_shows_failures(tmp_path):
    page = write_report(_rows(tmp_path), tmp_path)["html"].read_text()
    parser = _Images()
    parser.feed(page)
    expected = [f"objects/obj{i}/{name}.png" for i in range(3) for name in ("input", "views", "turntable")]
    assert parser.srcs == [*expected, "objects/broken/input.png"]
    assert parser.external == []  # self-contained: no scripts, stylesheets or remote resources
    assert "mesh extraction found no surface" in page and "broken|one" in page
    assert "93.6" in page and "DreamGaussian" in page


def test_non_finite_values_and_bad_rows(tmp_path):
    rows = [{"uid": "a", "psnr": math.inf, "fscore": 0.5}, {"uid": "b", "psnr": 20.0, "fscore": 0.7}]
    data = json.loads(write_report(rows, tmp_path)["json"].read_text())
    assert data["objects"][0]["psnr"] is None
    assert data["mean"]["psnr"] == 20.0 and data["n"]["psnr"] == 1
    assert data["mean"]["fscore"] == pytest.approx(0.6)
    assert data["mean"]["lpips"] is None
    with pytest.raises(ValueError, match="'x' failed without a 'reason'"):
        write_report([{"uid": "x", "status": "failed"}], tmp_path)
    with pytest.raises(ValueError, match=r"'x': fscore=93.6 is outside"):
        write_report([{"uid": "x", "fscore": 93.6}], tmp_path)
    with pytest.raises(ValueError, match="duplicate uid 'x'"):
        write_report([{"uid": "x"}, {"uid": "x"}], tmp_path)
    with pytest.raises(ValueError, match="status"):
        write_report([{"uid": "x", "status": "skipped"}], tmp_path)
    with pytest.raises(ValueError, match="clip must be a number"):
        write_report([{"uid": "x", "clip": "high"}], tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_metrics(tmp_path / "nowhere")


def test_unavailable_metrics_are_na_with_their_reason(tmp_path):
    rows = [{"uid": "a", "fscore": 0.8, "psnr": 18.0}, {"uid": "b", "fscore": 0.6, "psnr": 22.0}]
    why = {"clip": "no CLIP model configured", "lpips": "no LPIPS weights configured"}
    paths = write_report(rows, tmp_path, dataset="procedural", unavailable=why)
    md = paths["markdown"].read_text()
    ours = next(line for line in md.splitlines() if line.startswith("| **Ours"))
    cells = [c.strip() for c in ours.strip("|").split("|")]
    # Method | F-Score | Chamfer | CLIP | Time | PSNR | LPIPS | Mask IoU
    assert cells[1] == "70.0" and cells[5] == "20.00"
    assert cells[3] == "n/a" and cells[6] == "n/a" and cells[2] == "—"  # not measured vs measured-but-missing
    assert "CLIP-sim (%) ↑: not available (no CLIP model configured)" in md
    assert "LPIPS ↓: not available (no LPIPS weights configured)" in md
    per_object = [line for line in md.splitlines() if line.startswith("| a |")]
    assert per_object and per_object[0].count("n/a") == 2
    assert json.loads(paths["json"].read_text())["unavailable"] == why
    page = paths["html"].read_text()
    assert "not available (no CLIP model configured)" in page and "<td>n/a</td>" in page
    with pytest.raises(ValueError, match="unknown metric 'colour'"):
        write_report(rows, tmp_path, unavailable={"colour": "why"})
    with pytest.raises(ValueError, match="needs a reason"):
        write_report(rows, tmp_path, unavailable={"clip": ""})
