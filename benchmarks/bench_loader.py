"""Throughput of MultiSourceLoader: composed 64x64 det scenes vs the same loader over in-memory tensors.

The ratio says how much of the loader's time goes to generating/decoding samples rather than
to the loader machinery + transforms (which both runs share). "main ms/batch" is the main
process's CPU time per batch (receiving the collated batch from a worker): batch size / that
is the rate no worker count can exceed. Usage:
    .venv/bin/python benchmarks/bench_loader.py [--batches 40] [--workers 1,2] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import Dataset

from xlearner.config import AugmentSet, ComposerConfig, SourceConfig
from xlearner.data.loader import MultiSourceLoader
from xlearner.data.sources import build_source
from xlearner.data.transforms import build_transform


class InMemoryDet(Dataset):
    """uint8 (3,64,64) images and a few boxes each, already in memory: the loader's floor cost."""

    task, class_names, num_classes, name = "det", ["x"], 1, "memory"

    def __init__(self, n: int = 512, size: int = 64):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
        self.boxes = torch.tensor([[4.0, 4.0, 30.0, 30.0], [32.0, 20.0, 60.0, 50.0]])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], {"boxes": self.boxes.clone(), "labels": torch.zeros(2, dtype=torch.int64)}


def samples_per_second(ds: Dataset, batches: int, batch_size: int, workers: int, size: int = 64) -> tuple[float, float]:
    """(samples/s, main-process CPU ms per batch)."""
    tf = build_transform("det", size, train=True, augment=AugmentSet().of("det"))
    loader = MultiSourceLoader({"s": ds}, {"s": batch_size}, {"s": tf}, {"s": "det"}, seed=0,
                               num_workers=workers)
    for _ in range(3):  # start workers, fill the prefetch queue
        next(loader)
    t0, c0 = time.perf_counter(), time.thread_time()
    for _ in range(batches):
        next(loader)
    dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
    loader.close()
    return batches * batch_size / dt, 1e3 * cpu / batches


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", default="2", help="worker counts, comma-separated (e.g. 1,2)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = SourceConfig(name="glyphs", task="det", format="embedded", dataset="composed_det_glyphs",
                       composer=ComposerConfig(canvas_size=64))
    composed = build_source(cfg, "train")
    memory = InMemoryDet()
    for w in [int(v) for v in str(args.workers).split(",")]:
        print(f"MultiSourceLoader, det, 64x64, batch {args.batch_size}, {w} workers, "
              f"{args.batches} batches (torch threads 1 in the main process)")
        c, cm = samples_per_second(composed, args.batches, args.batch_size, w)
        m, mm = samples_per_second(memory, args.batches, args.batch_size, w)
        print(f"composed_det_glyphs : {c:9.1f} samples/s  main {cm:6.2f} ms/batch")
        print(f"in-memory tensors   : {m:9.1f} samples/s  main {mm:6.2f} ms/batch")
        print(f"ratio composed/memory: {c / m:.2f}")


if __name__ == "__main__":
    main()
