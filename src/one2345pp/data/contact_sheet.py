"""A contact sheet of a shard folder: per object the condition view, its tiled 3x2 targets and occupancy slices."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..utils.atomic import write_png


def _composite(rgba: np.ndarray, gray: float = 0.5) -> np.ndarray:
    a = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * a + 255.0 * gray * (1.0 - a)
    return rgb.round().astype(np.uint8)


def _occ_panel(occ: np.ndarray, height: int) -> np.ndarray:
    """The middle x, y and z slices of the occupancy shell stacked vertically, nearest-upscaled to ``height``."""
    from PIL import Image

    r = occ.shape[0]
    slices = [occ[r // 2, :, ::-1].T, occ[:, r // 2, ::-1].T, occ[:, :, r // 2].T]  # z up in the first two
    tiles = []
    for sl in slices:
        img = np.where(sl[..., None] > 0, np.array([230, 120, 40], np.uint8), np.array([40, 40, 48], np.uint8))
        side = height // 3
        tiles.append(np.asarray(Image.fromarray(img).resize((side, side), Image.NEAREST)))
    panel = np.concatenate(tiles, axis=0)
    return np.pad(panel, ((0, height - panel.shape[0]), (0, 0), (0, 0)), constant_values=255)


def write_contact_sheet(shard_dir: str | Path, out: str | Path, num: int = 4, row_height: int = 480) -> Path:
    """Read the first ``num`` samples of ``shard_dir`` with stock webdataset and write a PNG sheet."""
    import webdataset as wds
    from PIL import Image, ImageDraw

    shard_dir = Path(shard_dir)
    shards = sorted(str(p) for p in shard_dir.glob("shard-*.tar"))
    if not shards:
        raise FileNotFoundError(f"no shard-*.tar files in {shard_dir}")
    rows = []
    for sample in wds.WebDataset(shards, shardshuffle=False, empty_check=False):
        cond = np.asarray(Image.open(io.BytesIO(sample["cond0.png"])).convert("RGBA"))
        grid = np.asarray(Image.open(io.BytesIO(sample["mv0.png"])).convert("RGBA"))
        occ = np.load(io.BytesIO(sample["occ.npz"]))["occ"]
        h = row_height
        cond_img = Image.fromarray(_composite(cond)).resize((h // 2, h // 2), Image.BILINEAR)
        grid_img = Image.fromarray(_composite(grid)).resize((h * 2 // 3, h), Image.BILINEAR)
        row = Image.new("RGB", (h // 2 + h * 2 // 3 + h // 3 + 40, h + 24), (255, 255, 255))
        row.paste(cond_img, (0, 24))
        row.paste(grid_img, (h // 2 + 20, 24))
        row.paste(Image.fromarray(_occ_panel(occ, h)), (h // 2 + h * 2 // 3 + 40, 24))
        ImageDraw.Draw(row).text(
            (4, 4), f"{sample['__key__']}   condition | 3x2 target views | occupancy slices x/y/z", fill=(0, 0, 0)
        )
        rows.append(np.asarray(row))
        if len(rows) >= num:
            break
    sheet = np.concatenate(rows, axis=0)
    return write_png(out, sheet)
