"""``build_source(cfg, split)``: the one entry point from a SourceConfig to a SourceDataset."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from xlearner.config import ConfigError, SourceConfig


def open_source(cfg: SourceConfig, split: str = "train") -> Dataset:
    """The full split of a source (no max_samples): readers for user formats, embedded otherwise."""
    if cfg.format == "embedded":
        from xlearner.data.embedded import open_dataset  # lazy: fetch machinery is heavy

        ds = open_dataset(cfg.dataset, split, composer=cfg.composer)
        ds.bad.policy = cfg.on_bad_sample  # embedded data is verified by sha256, but keep the contract
    elif cfg.format == "shards":
        from xlearner.data.shards import ShardSource

        ds = ShardSource(cfg, split)
    else:
        from xlearner.data.readers import READERS

        ds = READERS[cfg.format](cfg, split)
    from xlearner import tasks

    if getattr(ds, "task", cfg.task) not in (cfg.task, tasks.get(cfg.task).reads):
        raise ConfigError(f"source '{cfg.name}' says task {cfg.task} but its data ({cfg.format}"
                          f"{' ' + cfg.dataset if cfg.dataset else ''}) is a {ds.task} dataset; fix task")
    return ds


def pack_source(cfg: SourceConfig, out, shard_samples: int = 1000, echo=print) -> dict:
    """`xlearner data pack`: every split the source has, written as shards (``shards.write_pack``)."""
    from xlearner.data.shards import packed_splits, write_pack

    if cfg.format == "shards":
        raise ConfigError(f"source '{cfg.name}' is already shards ({cfg.root}); copy the folder instead")
    splits = {}
    for split in packed_splits(cfg):
        ds = open_source(cfg, split)
        if not (split == "test" and getattr(ds, "test_is_val", False)):
            splits[split] = ds
    return write_pack(cfg, splits, out, shard_samples=shard_samples, echo=echo)


def build_source(cfg: SourceConfig, split: str = "train") -> Dataset:
    """Dataset of one split; ``max_samples`` takes a deterministic subset of train (by split_seed)."""
    ds = open_source(cfg, split)
    if split == "train" and cfg.max_samples is not None and len(ds) > cfg.max_samples:
        g = torch.Generator().manual_seed(cfg.split_seed)
        keep = sorted(torch.randperm(len(ds), generator=g)[: cfg.max_samples].tolist())
        ds = SubsetSource(ds, keep)
    return ds


class SubsetSource(Dataset):
    """A subset that still looks like a SourceDataset (name, task, class_names, bad, ...)."""

    def __init__(self, base: Dataset, indices: list[int]):
        self.base = base
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]

    def __getattr__(self, name: str):
        if name in ("base", "indices"):  # not yet set (unpickling)
            raise AttributeError(name)
        if name == "shard_sizes":  # a subset's records are not laid out in the base's shards
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"SubsetSource({self.base!r}, n={len(self)})"
