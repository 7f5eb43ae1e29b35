"""The multi-source loader: every ``next()`` gives one batch of EVERY source.

Why it is built this way:
- every step touches every source, so every head gets a gradient and DDP needs no
  ``find_unused_parameters``;
- each source has an infinite sampler over a fresh permutation per pass, a function of
  (seed, source name, pass), cut into disjoint per-rank shards (``rank::world_size`` after
  padding the permutation by wrap-around to a multiple of ``world_size``);
- the sampler yields ``(index, sample_seed)`` pairs and the transform runs under
  ``torch.manual_seed(sample_seed)`` in a forked RNG, so augmentation depends on (seed,
  position in the stream) only, never on which worker ran it or when;
- positions are counted in batches consumed by the caller (main process), so
  ``state_dict()`` is exact whatever the workers prefetched, and ``load_state_dict()``
  restarts each sampler at that position: the resumed run sees the same samples with the
  same augmentation.
``batch_sizes`` are per process (per rank).
"""
from __future__ import annotations

import zlib
from collections import OrderedDict
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler


def _mix(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy SeedSequence: stable across versions)."""
    state = np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & 0x7FFFFFFFFFFFFFFF


def source_key(name: str) -> int:
    return zlib.crc32(name.encode())


class ShardedInfiniteSampler(Sampler):
    """Infinite stream of ``(index, sample_seed)`` for one rank, starting at ``start`` samples in.

    Pass e of the data is ``randperm(n)`` seeded by (seed, source, e), padded by wrap-around to
    ``world_size * ceil(n / world_size)`` and sharded ``[rank::world_size]``: ranks see disjoint
    indices (up to the padding) and the same number per pass.

    With ``shard_sizes`` (a packed source's shards, in index order) and several ranks, pass e deals
    whole shards instead: the shards in a seeded order, each to the rank holding the fewest samples
    so far, so a rank reads only its own files; each rank then reads its shards' samples in a seeded
    order, wrapped or cut to ``ceil(n / world_size)`` (by less than one shard). One rank, or fewer
    shards than ranks, takes the plain permutation, so a packed source trains exactly as its files.
    """

    def __init__(self, n: int, *, seed: int, source: str, rank: int = 0, world_size: int = 1, start: int = 0,
                 shard_sizes: list[int] | None = None):
        if n <= 0:
            raise ValueError(f"source '{source}' has no samples")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.n, self.seed, self.source = n, seed, source
        self.key = source_key(source)
        self.rank, self.world_size, self.start = rank, world_size, start
        self.per_rank = -(-n // world_size)
        if shard_sizes is not None and sum(shard_sizes) != n:
            raise ValueError(f"source '{source}': shard sizes sum to {sum(shard_sizes)}, not its {n} samples")
        self.shard_sizes = list(shard_sizes) if shard_sizes and world_size > 1 and len(shard_sizes) >= world_size else None

    def shard(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(_mix(self.seed, self.key, epoch))
        if self.shard_sizes is not None:
            return self._whole_shards(g)
        perm = torch.randperm(self.n, generator=g).tolist()
        total = self.per_rank * self.world_size
        perm = (perm * (-(-total // self.n)))[:total]
        return perm[self.rank::self.world_size]

    def _whole_shards(self, g: torch.Generator) -> list[int]:
        starts = [0]
        for size in self.shard_sizes:
            starts.append(starts[-1] + size)
        loads, mine = [0] * self.world_size, []
        for j in torch.randperm(len(self.shard_sizes), generator=g).tolist():
            r = min(range(self.world_size), key=lambda q: (loads[q], q))
            loads[r] += self.shard_sizes[j]
            if r == self.rank:
                mine.extend(range(starts[j], starts[j + 1]))
        order = [mine[k] for k in torch.randperm(len(mine), generator=g).tolist()]
        return (order * (-(-self.per_rank // len(order))))[:self.per_rank]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pos = self.start
        epoch, offset = divmod(pos, self.per_rank)
        while True:
            shard = self.shard(epoch)
            for k in range(offset, self.per_rank):
                global_pos = (epoch * self.per_rank + k) * self.world_size + self.rank
                yield shard[k], _mix(self.seed, self.key, 1 << 40, global_pos)
            epoch, offset = epoch + 1, 0


class SeededTransformDataset(Dataset):
    """Reads ``base[index]`` and applies ``transform`` under ``torch.manual_seed(sample_seed)``."""

    def __init__(self, base: Dataset, transform: Callable | None):
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            index, sample_seed = item
        else:
            index, sample_seed = item, None
        with torch.random.fork_rng(devices=[]):
            if sample_seed is not None:
                # the CPU generator only: torch.manual_seed also seeds every accelerator
                # backend, ~0.5 ms per call, which would dominate a 64x64 sample
                torch.default_generator.manual_seed(sample_seed)
            image, target = self.base[index]
            if self.transform is not None:
                image, target = self.transform(image, target)
        return image, target


def collate(task: str, padded: bool | int = False, encode: Callable[[dict], dict] | None = None) -> Callable[[list], dict]:
    """Batch builder of a task (``tasks.Task.collate``; the layouts are in ``xlearner.tasks``).

    ``padded`` (det, training): boxes and labels as two padded tensors instead of a per-image list;
    an int pads them to at least that many boxes per image. ``encode``: applied to the batch after
    (``Task.target_encoder``: the loss's work on targets alone, done in the workers)."""
    from xlearner import tasks

    return _Collate(tasks.get(task), padded, encode)


class _Collate:
    """Picklable (DataLoader workers): the task object, the layout and the target encoder."""

    def __init__(self, task, padded: bool | int = False, encode: Callable[[dict], dict] | None = None):
        self.task = task
        self.padded = padded
        self.encode = encode

    def __call__(self, samples: list) -> dict:
        batch = self.task.collate(samples, self.padded)
        return self.encode(batch) if self.encode is not None else batch


class MultiSourceLoader:
    """Infinite iterator: ``next(loader)`` -> ``{source_name: batch}`` with every source present."""

    def __init__(self, datasets: dict[str, Dataset], batch_sizes: dict[str, int],
                 transforms: dict[str, Callable] | None, tasks: dict[str, str], *, seed: int,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, pin_memory: bool = False,
                 det_pad_boxes: int | None = None, target_encoders: dict[str, Callable[[dict], dict]] | None = None):
        if not datasets:
            raise ValueError("MultiSourceLoader needs at least one source")
        for what, d in (("batch_sizes", batch_sizes), ("tasks", tasks)):
            missing = sorted(set(datasets) - set(d))
            if missing:
                raise ValueError(f"{what} has no entry for sources {missing}")
        self.datasets = datasets
        self.batch_sizes = {k: int(batch_sizes[k]) for k in datasets}
        self.transforms = {k: (transforms or {}).get(k) for k in datasets}
        self.tasks = {k: tasks[k] for k in datasets}
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.padded = det_pad_boxes or True
        self.target_encoders = dict(target_encoders or {})
        self._consumed = {k: 0 for k in datasets}
        self._iters: dict[str, Iterator] | None = None
        self._loaders: dict[str, DataLoader] = {}

    def _build(self) -> None:
        self._iters, self._loaders = {}, {}
        for name, ds in self.datasets.items():
            bs = self.batch_sizes[name]
            sampler = ShardedInfiniteSampler(len(ds), seed=self.seed, source=name, rank=self.rank,
                                             world_size=self.world_size, start=self._consumed[name] * bs,
                                             shard_sizes=getattr(ds, "shard_sizes", None))
            loader = DataLoader(
                SeededTransformDataset(ds, self.transforms[name]), batch_size=bs, sampler=sampler,
                drop_last=True, num_workers=self.num_workers, pin_memory=self.pin_memory,
                persistent_workers=self.num_workers > 0, collate_fn=collate(self.tasks[name], self.padded, self.target_encoders.get(name)),
                prefetch_factor=4 if self.num_workers > 0 else None,
                # own generator: creating iterators must not consume the global torch RNG
                generator=torch.Generator().manual_seed(_mix(self.seed, source_key(name), 7)),
            )
            self._loaders[name] = loader
            self._iters[name] = iter(loader)

    def __iter__(self) -> "MultiSourceLoader":
        return self

    def __next__(self) -> dict[str, dict]:
        if self._iters is None:
            self._build()
        batch = {}
        for name, it in self._iters.items():
            batch[name] = next(it)
            self._consumed[name] += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """Batches consumed per source (by the caller, not prefetched)."""
        return dict(self._consumed)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly after the batches counted in ``state`` (same samples, same augmentation)."""
        if set(state) != set(self.datasets):
            raise ValueError(f"loader state is for sources {sorted(state)} but this loader has "
                             f"{sorted(self.datasets)}; resume with the same sources")
        self.close()
        self._consumed = {k: int(state[k]) for k in self.datasets}

    def close(self) -> None:
        """Stop worker processes (they also stop when the loader is garbage collected)."""
        for it in (self._iters or {}).values():
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self._iters, self._loaders = None, {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class _EvalCollate:
    """The task's batch, plus ``meta`` (one dict per image) when the eval transform attached it."""

    def __init__(self, task: str):
        self.base = collate(task)

    def __call__(self, samples: list) -> dict:
        batch = self.base(samples)
        if samples and "meta" in samples[0][1]:
            batch["meta"] = [t["meta"] for _, t in samples]
        return batch


def eval_loader(dataset: Dataset, task: str, size: int, batch_size: int, num_workers: int = 0,
                pin_memory: bool = False, resize: str = "square", original: bool = False) -> DataLoader:
    """Finite, unshuffled loader with the eval transform (resize + normalise), for validation/transfer.

    ``resize``: the source's mode (square | keep_ratio); ``original``: batches also carry ``meta``
    for scoring at each image's original size (``metrics.DetEvaluator`` / ``SegEvaluator``)."""
    from xlearner.data.transforms import build_transform

    tf = build_transform(task, size, train=False, resize=resize, original=original)
    return DataLoader(SeededTransformDataset(dataset, tf),
                      batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers,
                      pin_memory=pin_memory, collate_fn=_EvalCollate(task))


EVAL_CACHE_BYTES = 2 * 1024 ** 3
"""Most bytes of eval batches ``eval_batches`` keeps (least recently used go first)."""
_eval_cache: "OrderedDict[tuple, tuple[list[dict], int]]" = OrderedDict()


def _nbytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def eval_batches(dataset: Dataset, task: str, size: int, batch_size: int, *, resize: str = "square",
                 original: bool = False, key: tuple | None = None):
    """The batches of ``eval_loader(dataset, ...)``. With ``key`` (it must name the dataset's content,
    e.g. its source config, split and subset) they are kept in memory, up to ``EVAL_CACHE_BYTES``
    in all, and the next call with the same key and settings gets the same batches back (the eval
    transform is deterministic, so the values are those a new loader would give). Callers must
    not modify the batches."""
    if key is None:
        return eval_loader(dataset, task, size, batch_size, resize=resize, original=original)
    full = (key, task, int(size), int(batch_size), resize, bool(original))
    if full in _eval_cache:
        _eval_cache.move_to_end(full)
        return _eval_cache[full][0]
    batches = list(eval_loader(dataset, task, size, batch_size, resize=resize, original=original))
    nbytes = _nbytes(batches)
    if nbytes <= EVAL_CACHE_BYTES:
        _eval_cache[full] = (batches, nbytes)
        while sum(n for _, n in _eval_cache.values()) > EVAL_CACHE_BYTES:
            _eval_cache.popitem(last=False)
    return batches


class CachedEvalLoader:
    """:func:`eval_batches` under ``key`` as a loader: the batches are built on the first pass and
    replayed from memory after it. A stage validates each source twice (with its trained and with
    precise-BN statistics, which it estimates on a third set), and every stage of ``xlearner run``
    validates the same sources: in the ``gpu`` preset, composing and transforming those images in
    the main process took most of each stage's validation time."""

    def __init__(self, dataset: Dataset, task: str, size: int, batch_size: int, *, key: tuple,
                 resize: str = "square", original: bool = False):
        self.dataset = dataset  # evaluators read it (a det source's COCO file, a seg source's class names)
        self._args = (dataset, task, size, batch_size)
        self._kwargs = {"resize": resize, "original": original, "key": key}

    def __iter__(self) -> Iterator[dict]:
        return iter(eval_batches(*self._args, **self._kwargs))
