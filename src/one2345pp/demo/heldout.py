"""Held-out inputs: procedural objects of another seed, built into shards by the shard builder itself (``one2345pp
data build``, the training data's recipe), so their condition views are rendered exactly as the training data's.
:func:`extract_images` takes each object's condition view (the input of ``infer``) and the 3x2 grid of its six
target views (the ground truth beside the generated views) out of those shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from ..utils.atomic import write_bytes, write_json

FOLDER = "heldout"
SHARDS = f"{FOLDER}/shards"
INDEX = "images.json"


def _on_gray(png: bytes) -> bytes:
    from PIL import Image

    grid = Image.open(io.BytesIO(png)).convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", grid.size, (128, 128, 128, 255)), grid).convert("RGB")
    buf = io.BytesIO()
    flat.save(buf, format="PNG")
    return buf.getvalue()


def shard_fields(shards, fields) -> dict[str, dict[str, bytes]]:
    """``{uid: {field: bytes}}`` of the named ``fields`` of every sample in the shard files, in shard order."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                uid, _, field = member.name.partition(".")
                if field in fields:
                    samples.setdefault(uid, {})[field] = tar.extractfile(member).read()
    return samples


def extract_images(out: Path, limit: int | None = None) -> list[dict]:
    """``OUT/heldout/shards/shard-*.tar`` -> ``OUT/heldout/<uid>.png`` (the RGBA condition view 0: the pipeline takes
    its alpha as the mask) and ``<uid>_gt_views.png`` (its six target views on gray), for the first ``limit``
    objects in shard order. Returns one record per image (``name``, ``input`` and ``gt_views`` relative to OUT, the
    condition camera's ``azimuth_deg`` / ``elevation_deg``), also written to ``OUT/heldout/images.json``."""
    folder = out / FOLDER
    shards = sorted((out / SHARDS).glob("shard-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shard-*.tar in {out / SHARDS}")
    samples = shard_fields(shards, ("cond0.png", "mv0.png", "cams.json"))
    records = []
    for uid, fields in list(samples.items())[:limit]:
        missing = {"cond0.png", "mv0.png", "cams.json"} - set(fields)
        if missing:
            raise ValueError(f"held-out sample {uid} lacks {', '.join(sorted(missing))}")
        inp, gt = folder / f"{uid}.png", folder / f"{uid}_gt_views.png"
        write_bytes(inp, fields["cond0.png"])
        write_bytes(gt, _on_gray(fields["mv0.png"]))
        cond = json.loads(fields["cams.json"])["samples"][0]["cond"]
        records.append(
            {
                "name": uid,
                "input": f"{FOLDER}/{inp.name}",
                "gt_views": f"{FOLDER}/{gt.name}",
                "azimuth_deg": cond["azimuth_deg"],
                "elevation_deg": cond["elevation_deg"],
            }
        )
    write_json(folder / INDEX, records)
    return records
