"""LightningDataModules streaming WebDataset shards: 2D (multi-view) and 3D (volumes) samples.

Pipeline per split: ``wds.WebDataset`` (shards split by DDP rank, then by loader worker) -> sample shuffle buffer
(training) -> decode (corrupt samples logged, counted and skipped) -> batches built inside the workers ->
:class:`ShardLoader` (a ``wds.WebLoader``).

Training with ``resampled=True`` draws shards with replacement forever and cuts every epoch at
``epoch_samples // batch_size`` batches, so every DDP rank runs the same number of steps. Without resampling each
rank reads its own disjoint shards once per epoch (ranks may then see different batch counts).

Randomness (shard draws, shuffle buffer, condition index, random background) comes from per-process streams seeded
from ``(cfg.seed, split, epoch, rank, worker)``; workers are started fresh every epoch (no persistent workers) and
seeded in ``worker_init_fn``, which also seeds ``random``, ``numpy`` and ``torch`` there. The epoch is the trainer's
``current_epoch`` when the module is attached to a trainer, else the number of times the train loader was iterated.
"""

from __future__ import annotations

import abc
import logging
import multiprocessing
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from lightning.pytorch import LightningDataModule

from one2345pp.data.config import LoaderConfig
from one2345pp.data.decode import CorruptSample, decode_views, decode_volumes, pick_condition

__all__ = [
    "MultiViewDataModule",
    "MultiViewDecoder",
    "ShardDataModule",
    "ShardLoader",
    "SkipCounter",
    "VolumeDataModule",
    "VolumeDecoder",
    "WorkerSeeder",
    "collate_samples",
    "resolve_shards",
    "stream_seed",
]

log = logging.getLogger(__name__)

TRAIN, VAL = 0, 1
SPARSE_KEYS = ("fine_coords", "fine_sdf", "fine_rgb")


# ----------------------------------------------------------------------------------------------------------- seeds
def stream_seed(base_seed: int, split: int, epoch: int, rank: int, worker: int) -> int:
    """A 63-bit seed, distinct for every (seed, split, epoch, rank, worker)."""
    entropy = [int(base_seed) & (2**64 - 1), split, epoch, rank, worker]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class _Stream:
    seed: int
    torch: torch.Generator
    py: random.Random


_STREAMS: dict[int, _Stream] = {}  # per process: the random stream of each split's pipeline


def _set_stream(split: int, seed: int) -> None:
    gen = torch.Generator()
    gen.manual_seed(seed)
    _STREAMS[split] = _Stream(seed, gen, random.Random(seed))


def _stream(split: int, base_seed: int) -> _Stream:
    if split not in _STREAMS:  # iterated outside a ShardLoader: rank/worker from the environment, epoch 0
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        _set_stream(split, stream_seed(base_seed, split, 0, rank, worker))
    return _STREAMS[split]


def _stream_seed_value(split: int, base_seed: int) -> int:
    return _stream(split, base_seed).seed


@dataclass
class WorkerSeeder:
    """``worker_init_fn``: seeds a worker from (base seed, split, epoch, rank, worker id); epoch/rank set per epoch."""

    base_seed: int
    split: int
    epoch: int = 0
    rank: int = 0

    def seed(self, worker: int) -> int:
        return stream_seed(self.base_seed, self.split, self.epoch, self.rank, worker)

    def seed_stream(self, worker: int) -> None:
        """Seed only this split's pipeline stream (used in-process, where global RNGs belong to the trainer)."""
        _set_stream(self.split, self.seed(worker))

    def __call__(self, worker_id: int) -> None:
        s = self.seed(worker_id)
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)
        _set_stream(self.split, s)


def _seeded_shuffle(src, bufsize: int, split: int, base_seed: int):
    """Sample shuffle buffer drawing from the split's stream (deterministic per worker and epoch)."""
    rng = random.Random(_stream(split, base_seed).py.getrandbits(64))
    return wds.filters.shuffle(bufsize, initial=bufsize, rng=rng)(src)


# -------------------------------------------------------------------------------------------------------- handlers
class SkipCounter:
    """Pipeline exception handler: logs and counts the exceptions it accepts, re-raises the others.

    The count lives in shared memory, so skips inside loader workers add up in the main process. It counts skips,
    not distinct samples: a resampled stream can meet the same corrupt sample again.
    """

    def __init__(self, what: str, accept: tuple[type[BaseException], ...]):
        self.what, self.accept = what, accept
        self._count = multiprocessing.Value("q", 0)

    @property
    def count(self) -> int:
        return int(self._count.value)

    def __call__(self, exn: BaseException) -> bool:
        if not isinstance(exn, self.accept):
            raise exn
        with self._count.get_lock():
            self._count.value += 1
            n = self._count.value
        worker = wds.utils.pytorch_worker_info()[2]
        log.warning("skipping %s (worker %d, %d skipped so far): %s", self.what, worker, n, exn)
        return True


# --------------------------------------------------------------------------------------------------------- collate
def collate_samples(samples: Sequence[dict]) -> dict:
    """Batch decoded samples: tensors stacked, sparse fine cells concatenated, anything else listed.

    ``fine_coords`` [M_b, 3] of every sample become one int32 [N, 4] tensor with the batch index first
    (``[b, x, y, z]``); ``fine_sdf`` [N] and ``fine_rgb`` [N, 3] are concatenated in the same order.
    """
    if not samples:
        raise ValueError("cannot collate an empty batch")
    keys = list(samples[0])
    for s in samples[1:]:
        if set(s) != set(keys):
            raise ValueError(f"samples disagree on fields: {sorted(keys)} vs {sorted(s)}")
    out: dict = {}
    if "fine_coords" in keys:
        out["fine_coords"] = torch.cat(
            [
                torch.cat([torch.full((len(s["fine_coords"]), 1), b, dtype=torch.int32), s["fine_coords"].int()], 1)
                for b, s in enumerate(samples)
            ]
        )
        for key in SPARSE_KEYS[1:]:
            out[key] = torch.cat([s[key] for s in samples])
    for key in keys:
        if key in out:
            continue
        values = [s[key] for s in samples]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


# ---------------------------------------------------------------------------------------------------------- shards
def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _expand(pattern: str) -> list[str]:
    """Shard URLs of a brace pattern, a glob (``data/x/shard-*.tar``) or a folder (all its ``shard-*.tar``).

    Folders and globs suit builder output, whose shard numbers can have gaps (each rank numbers its own shards).
    """
    if _is_local(pattern) and Path(pattern).is_dir():
        pattern = str(Path(pattern) / "shard-*.tar")
    if _is_local(pattern) and any(ch in pattern for ch in "*?["):
        urls = sorted(str(p) for p in Path("/").glob(str(Path(pattern).resolve()).lstrip("/")))
        if not urls:
            raise FileNotFoundError(f"no shards match {pattern!r}")
        return urls
    urls = wds.shardlists.expand_urls(pattern)
    missing = [u for u in urls if _is_local(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards of {pattern!r} do not exist, e.g. {missing[0]}")
    if not urls:
        raise ValueError(f"shard pattern {pattern!r} expands to no shards")
    return urls


def resolve_shards(cfg: LoaderConfig) -> tuple[list[str], list[str]]:
    """(train, val) shard URLs: ``val_shards`` if given, else the last train shard held out (when there are >= 2)."""
    train = _expand(cfg.train_shards)
    if cfg.val_shards is not None:
        return train, _expand(cfg.val_shards)
    if len(train) >= 2:
        return train[:-1], train[-1:]
    log.warning(
        "only one shard (%s) and no val_shards: validation reads the TRAINING shard, so validation metrics are not "
        "held out; set val_shards or write more shards",
        train[0],
    )
    return train, list(train)


# ---------------------------------------------------------------------------------------------------------- loader
class ShardLoader(wds.WebLoader):
    """``wds.WebLoader`` over batches made in the workers; re-seeds the workers for the current epoch and rank."""

    def __init__(
        self,
        dataset: wds.DataPipeline,
        num_workers: int,
        seeder: WorkerSeeder,
        epoch_fn: Callable[[], int],
        nbatches: int | None = None,
    ):
        super().__init__(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=num_workers,
            worker_init_fn=seeder,
            persistent_workers=False,  # fresh workers every epoch, seeded for that epoch
            pin_memory=torch.cuda.is_available(),
        )
        self.source, self.num_workers, self.seeder, self.epoch_fn = dataset, num_workers, seeder, epoch_fn
        self.nbatches = nbatches
        if nbatches is not None:
            self.with_epoch(nbatches)

    def __len__(self) -> int:
        if self.nbatches is None:
            raise TypeError("a non-resampled shard loader has no known length")
        return self.nbatches

    def __iter__(self):
        epoch = self.epoch_fn()
        self.seeder.epoch, self.seeder.rank = epoch, wds.utils.pytorch_worker_info()[0]
        for stage in self.source.pipeline:
            if isinstance(stage, wds.filters.detshuffle):
                stage.epoch = epoch - 1  # detshuffle increments before use
        if self.num_workers == 0:
            self.seeder.seed_stream(0)
        return super().__iter__()


# -------------------------------------------------------------------------------------------------------- decoders
@dataclass
class MultiViewDecoder:
    """Raw sample -> 2D training sample (random condition when training, condition 0 for validation)."""

    train: bool
    split: int
    base_seed: int
    background: str = "gray"
    view_resolution: int | None = None
    cond_resolution: int | None = None
    cond_fill: float | None = None

    def _args(self, sample: dict) -> tuple[int, str, torch.Generator | None]:
        gen = _stream(self.split, self.base_seed).torch if self.train else None
        background = self.background if self.train or self.background != "random" else "gray"
        return pick_condition(sample, gen), background, gen

    def __call__(self, sample: dict) -> dict:
        k, background, gen = self._args(sample)
        return decode_views(sample, k, background, gen, self.view_resolution, self.cond_resolution, self.cond_fill)


@dataclass
class VolumeDecoder(MultiViewDecoder):
    """Raw sample -> 3D training sample (volumes, sparse fine cells, the six views of one condition)."""

    def __call__(self, sample: dict) -> dict:
        k, background, gen = self._args(sample)
        return decode_volumes(sample, k, background, gen, self.view_resolution, self.cond_resolution, self.cond_fill)


# ---------------------------------------------------------------------------------------------------- data modules
class ShardDataModule(LightningDataModule, abc.ABC):
    """Streams shards matching :class:`LoaderConfig`; subclasses choose how a raw sample is decoded."""

    def __init__(self, cfg: LoaderConfig):
        super().__init__()
        if cfg.batch_size < 1 or cfg.num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {cfg.batch_size}, {cfg.num_workers}")
        if cfg.cond_fill is not None and not 0.05 <= cfg.cond_fill <= 1.0:
            raise ValueError(f"data.cond_fill={cfg.cond_fill} must lie in [0.05, 1] (or be null: as rendered)")
        if cfg.resampled and cfg.epoch_samples < cfg.batch_size:
            raise ValueError(f"epoch_samples ({cfg.epoch_samples}) is smaller than one batch ({cfg.batch_size})")
        self.cfg = cfg
        self.train_urls, self.val_urls = resolve_shards(cfg)
        self.corrupt_counter = SkipCounter("corrupt sample", (CorruptSample,))
        self.shard_error_counter = SkipCounter("unreadable shard data", (Exception,))
        self._train_iterations = 0

    @property
    def corrupt_count(self) -> int:
        """Corrupt samples skipped so far, summed over all loader workers."""
        return self.corrupt_counter.count

    @property
    def shard_error_count(self) -> int:
        """Shard read errors (truncated tar, unreadable file) skipped so far."""
        return self.shard_error_counter.count

    @property
    def batches_per_epoch(self) -> int | None:
        """Training batches per rank per epoch when resampled, else None (one pass over the rank's shards)."""
        return self.cfg.epoch_samples // self.cfg.batch_size if self.cfg.resampled else None

    @abc.abstractmethod
    def sample_decoder(self, train: bool, split: int) -> Callable[[dict], dict]:
        """A picklable callable turning a raw sample into a dict of tensors (raising CorruptSample on bad data)."""

    def build_dataset(self, urls: list[str], train: bool) -> wds.DataPipeline:
        """Shards -> (shuffled) decoded samples -> batches, as one WebDataset pipeline."""
        cfg, split = self.cfg, TRAIN if train else VAL
        resampled = cfg.resampled and train
        ds = wds.WebDataset(
            urls,
            handler=self.shard_error_counter,
            resampled=resampled,
            shardshuffle=False if resampled or not train else len(urls),
            detshuffle=True,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            seed=cfg.seed,
            empty_check=False,  # with more workers than shards some workers legitimately read nothing
        )
        if resampled:  # deterministic shard draws from the worker's stream (the stock source mixes in time and pid)
            ds.pipeline[0] = wds.ResampledShards(
                urls, seed=cfg.seed, worker_seed=partial(_stream_seed_value, split, cfg.seed), deterministic=True
            )
        if train and cfg.shuffle_buffer > 1:
            ds = ds.compose(partial(_seeded_shuffle, bufsize=cfg.shuffle_buffer, split=split, base_seed=cfg.seed))
        ds = ds.map(self.sample_decoder(train, split), handler=self.corrupt_counter)
        return ds.batched(cfg.batch_size, collation_fn=collate_samples, partial=not train)

    def _loader(self, urls: list[str], train: bool) -> ShardLoader:
        cfg = self.cfg
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        workers = cfg.num_workers
        if not (cfg.resampled and train):
            mine = len(urls[rank::world]) if world > 1 else len(urls)
            if mine == 0 and not train:  # the other ranks would wait for it in the first collective (gloo aborts)
                raise ValueError(
                    f"validation under DDP needs at least one shard per rank: rank {rank} of {world} gets none of "
                    f"the {len(urls)} validation shard(s); set data.val_shards to {world} or more shards (or write "
                    "more shards, the last of which is held out), or trainer.limit_val_batches=0"
                )
            if mine == 0:
                log.warning("rank %d of %d gets none of the %d %s shards", rank, world, len(urls), _name(train))
            workers = min(workers, max(mine, 1))
            if train and world > 1:
                log.warning("training without resampled shards under DDP: ranks may run different numbers of steps")
        seeder = WorkerSeeder(cfg.seed, TRAIN if train else VAL)
        epoch_fn = self._train_epoch if train else _zero
        nbatches = self.batches_per_epoch if train else None
        return ShardLoader(self.build_dataset(urls, train), workers, seeder, epoch_fn, nbatches)

    def _train_epoch(self) -> int:
        trainer = self.trainer
        if trainer is not None:
            return int(trainer.current_epoch)
        self._train_iterations += 1
        return self._train_iterations - 1

    def train_dataloader(self) -> ShardLoader:
        return self._loader(self.train_urls, train=True)

    def val_dataloader(self) -> ShardLoader:
        return self._loader(self.val_urls, train=False)


def _name(train: bool) -> str:
    return "training" if train else "validation"


def _zero() -> int:
    return 0


class MultiViewDataModule(ShardDataModule):
    """2D stage: condition image, tiled six-view target grid, cameras."""

    def sample_decoder(self, train: bool, split: int) -> MultiViewDecoder:
        c = self.cfg
        return MultiViewDecoder(train, split, c.seed, c.background, c.view_resolution, c.cond_resolution, c.cond_fill)


class VolumeDataModule(ShardDataModule):
    """3D stages: coarse occupancy, sparse fine cells, the six views of one condition and their cameras."""

    def sample_decoder(self, train: bool, split: int) -> VolumeDecoder:
        c = self.cfg
        return VolumeDecoder(train, split, c.seed, c.background, c.view_resolution, c.cond_resolution, c.cond_fill)
