"""The shard builder: any mesh source -> ``DIR/shard-%06d.tar`` (WebDataset) + ``DIR/manifest.jsonl``.

* Inputs are split disjointly across ``world_size`` ranks (``items[rank::world_size]``, e.g. one SLURM array task
  each); rank r writes shard numbers ``r, r + S, r + 2S, ...`` so ranks never collide.
* ``workers`` processes render and voxelise in parallel; the main process writes shards.
* A shard is written as ``shard-XXXXXX.tar.tmp`` and renamed when complete; only then are its objects appended to
  the manifest as ``done``. A crash therefore leaves no half shard and no manifest line for unfinished objects.
  (A kill in the instant between the rename and the manifest append leaves those objects unrecorded; the rerun
  builds them again into a new shard, so they then appear twice. Readers that need uniqueness keep the first.)
* A bad input is appended as ``failed`` with its reason and the job goes on. A rerun skips every uid the manifest
  already holds (``retry_failed`` retries the failed ones).
* The resolved config is saved as ``DIR/config.yaml``; a rerun with different settings into the same folder is
  refused, so one folder never mixes recipes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path

from omegaconf import OmegaConf

from ..cameras import get_layout
from ..config import check_or_save_config
from ..geometry.mesh import MeshError
from ..geometry.mesh_io import resolve_up_axis
from ..rendering.raycast import RaycastRenderer
from .config import DataConfig
from .sample import build_sample
from .sources import SourceItem, list_items

MANIFEST = "manifest.jsonl"
SHARD_PATTERN = "shard-{:06d}.tar"


class Manifest:
    """Append-only JSON-lines record of every input: uid, source path, status, reason, shard."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        records: dict[str, dict] = {}
        if not self.path.is_file():
            return records
        with open(self.path) as f:
            for line_no, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from a killed job: ignore it, the object is redone
                    print(f"warning: {self.path}:{line_no}: unreadable manifest line ignored")
                    continue
                records[rec["uid"]] = rec
        return records

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn line of a killed job: end it first
                data = b"\n" + data
            os.write(fd, data)  # one write per batch: concurrent ranks appending do not interleave lines
        finally:
            os.close(fd)


class ShardWriter:
    """Writes samples into numbered shards of at most ``max_samples``, each renamed into place when complete."""

    def __init__(self, out: Path, rank: int, world_size: int, max_samples: int, manifest: Manifest):
        self.out, self.rank, self.world_size = out, rank, world_size
        self.max_samples = max_samples
        self.manifest = manifest
        self.written: list[str] = []
        self._tar = self._file = None
        self._pending: list[dict] = []
        self._index = None
        self._next_j = 0
        for stale in out.glob("shard-*.tar.tmp"):  # leftovers of a killed run of this rank
            idx = int(stale.name[6:12])
            if idx % world_size == rank:
                stale.unlink()

    def _open(self):
        import webdataset as wds

        while True:
            idx = self.rank + self.world_size * self._next_j
            self._next_j += 1
            if not (self.out / SHARD_PATTERN.format(idx)).exists():
                break
        self._index = idx
        self._file = open(self._tmp_path(), "wb")
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0)

    def _tmp_path(self) -> Path:
        return self.out / (SHARD_PATTERN.format(self._index) + ".tmp")

    def add(self, uid: str, fields: dict[str, bytes], record: dict) -> None:
        if self._tar is None:
            self._open()
        self._tar.write({"__key__": uid, **fields})
        self._pending.append(record)
        if len(self._pending) >= self.max_samples:
            self.finish()

    def finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = SHARD_PATTERN.format(self._index)
        os.replace(self._tmp_path(), self.out / name)
        self.manifest.append([{**r, "shard": name} for r in self._pending])
        self.written.append(name)
        self._tar = self._file = None
        self._pending = []


@dataclass
class BuildResult:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"done {self.done} / skipped {self.skipped} / failed {self.failed} "
            f"({len(self.shards)} shards written in {self.seconds:.1f} s)"
        )


# --- worker side ------------------------------------------------------------------------------------------------
_WORKER: dict = {}


def _init_worker(cfg: DataConfig, threads: int) -> None:
    cfg = replace(cfg, render=replace(cfg.render, threads=threads))
    _WORKER.update(cfg=cfg, renderer=RaycastRenderer(cfg.render), threads=threads)


def _process(item: SourceItem):
    cfg = _WORKER["cfg"]
    try:
        mesh = item.load(cfg.procedural, cfg.up_axis)
        fields, _ = build_sample(mesh, item.uid, mesh.source, cfg, _WORKER["renderer"], _WORKER["threads"])
    except MeshError as exc:
        return item, None, exc.reason, None
    except Exception as exc:  # any other failure of one object is recorded, not fatal
        return item, None, f"{type(exc).__name__}: {exc}", None
    return item, fields, None, mesh.source


def build_shards(
    source: str,
    out: str | Path,
    cfg: DataConfig,
    input_path: str | None = None,
    num_objects: int | None = None,
    workers: int = 1,
    rank: int = 0,
    world_size: int = 1,
    retry_failed: bool = False,
    progress: bool = True,
) -> BuildResult:
    """Build (or continue building) the shards of one source into ``out``; see the module docstring."""
    from tqdm import tqdm

    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank} world_size={world_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    _check_settings(cfg)
    items = list_items(source, input_path, num_objects, cfg.procedural, out)
    dup = [u for u, n in Counter(i.uid for i in items).items() if n > 1]
    if dup:
        raise ValueError(f"duplicate uids in the {source} source: {dup[:5]}")
    out.mkdir(parents=True, exist_ok=True)
    check_or_save_config(
        out / "config.yaml",
        OmegaConf.create({"data": OmegaConf.structured(cfg)}),
        what="a shard build",
        remedy="use another --out folder or the same settings",
        ignore=[f"data.{k}" for k in _RUN_ONLY_KEYS],
        read=_read_build_config,
        keep=True,  # config.yaml records the settings the shards were built with
    )
    mine = items[rank::world_size]
    manifest = Manifest(out / MANIFEST)
    held = manifest.load()
    todo = [it for it in mine if it.uid not in held or (retry_failed and held[it.uid].get("status") == "failed")]
    result = BuildResult(skipped=len(mine) - len(todo))
    writer = ShardWriter(out, rank, world_size, cfg.shards.max_samples, manifest)
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"shards rank {rank}/{world_size}", unit="obj", disable=not progress)

    def handle(res):
        item, fields, reason, read_path = res
        if fields is None:
            result.failed += 1
            result.failures.append((item.uid, reason))
            manifest.append([{"uid": item.uid, "source": item.path, "status": "failed", "reason": reason}])
        else:
            result.done += 1
            writer.add(item.uid, fields, {"uid": item.uid, "source": read_path or item.path, "status": "done"})
        bar.update(1)
        bar.set_postfix(done=result.done, failed=result.failed, skipped=result.skipped)

    try:
        if workers == 1 or len(todo) <= 1:
            _init_worker(cfg, cfg.render.threads)
            for item in todo:
                handle(_process(item))
        else:
            # spawn: open3d's thread pools do not survive fork. A worker that dies (a crash inside a native library)
            # breaks the executor with an error instead of hanging the job; the rerun continues from the manifest.
            ctx = mp.get_context("spawn")
            # Results are written in the order of the items, not of completion, so that a build gives the same shards
            # (and the same held-out last shard) whatever the workers' timing; a window of submitted items keeps the
            # workers busy and bounds the results waiting behind a slow object.
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(cfg, 1)) as pool:
                items = iter(todo)
                pending = deque(pool.submit(_process, item) for item in islice(items, 4 * workers))
                while pending:
                    res = pending.popleft().result()
                    for item in islice(items, 1):
                        pending.append(pool.submit(_process, item))
                    handle(res)
        writer.finish()
    finally:
        bar.close()
    result.shards = writer.written
    result.seconds = time.perf_counter() - t0
    return result


# settings that change how a job runs, not what the samples hold: free to differ between runs into one folder
_RUN_ONLY_KEYS = ("render.threads", "shards.max_samples", "shards.png_compress_level")


def _check_settings(cfg: DataConfig) -> None:
    """Fail before anything is written when a setting cannot work (not once per object, nor inside a worker)."""
    get_layout(cfg.layout)
    resolve_up_axis("model.glb", cfg.up_axis)  # an unknown up axis fails here
    RaycastRenderer(cfg.render)
    if cfg.cond_samples < 1:
        raise ValueError(f"data.cond_samples must be >= 1, got {cfg.cond_samples}")
    if not cfg.cond_elevation_min <= cfg.cond_elevation_max:
        raise ValueError("data.cond_elevation_min must not exceed data.cond_elevation_max")


def _read_build_config(path: Path):
    """An earlier build's ``data`` section over today's defaults, so that keys added since do not count as changed."""
    return OmegaConf.create(
        {"data": OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path).get("data", {}))}
    )
