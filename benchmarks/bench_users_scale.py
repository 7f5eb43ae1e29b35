"""Users' shapes on this machine: the template `imagenet_coco_ade20k.yaml` (ResNet-50, cls at 224 px,
det keep-ratio at 1024 px on the longer side (768 on the shorter of a 4:3 photo), seg keep-ratio
at 512 px, 150 ADE classes with ``reduce_zero_label``) on synthetic sources written in the real
formats at real sizes, a few steps of every stage and one transfer per task.

Writes (once, under ``--data``): ImageNet-like JPEG class folders (sizes around 500x375),
COCO-like ``instances_*.json`` on 640x480 JPEGs with polygon masks and crowd regions (RLE),
and ADE-like images with 8-bit PNG masks (0 = other, 1..150). Then measures with the machinery
of ``xlearner bench`` (each stage trained as ``xlearner run`` trains it): per stage the step and
data-wait seconds, peak memory (RSS on CPU, the allocator's peak on CUDA), backbone parameters
and forward GFLOPs per image; then per source a transfer (frozen / linear, a few steps).

    python benchmarks/bench_users_scale.py                         # single process
    torchrun --nproc_per_node 2 benchmarks/bench_users_scale.py --stages-only   # 2 ranks (gloo on CPU)
    python benchmarks/bench_users_scale.py --shards                # loaders: packed shards against the files

On CPU the batches are scaled down (``--batch-scale``, default 0.125 there: 8 / 1 / 1 images per
source and step) so that a step takes seconds, not minutes; shapes per image are the template's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ADE_CLASSES = 150


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A JPEG-able image with some structure (smooth colour field plus noise), not flat noise."""
    base = rng.integers(0, 255, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 20, (h, w, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def write_imagefolder(root: Path, classes: int, per_class: int, rng) -> None:
    sizes = [(500, 375), (375, 500), (500, 333), (640, 480), (500, 400)]
    for split, n in (("train", per_class), ("val", max(1, per_class // 4))):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = sizes[int(rng.integers(len(sizes)))]
                _photo(rng, w, h).save(d / f"n{c:08d}_{i}.JPEG", quality=90)


def write_coco(root: Path, split: str, n: int, rng) -> Path:
    """640x480 JPEGs and an instances JSON: COCO's 80 category ids (1..90 with gaps), polygons,
    and one crowd region per image as RLE."""
    from pycocotools import mask as mask_utils

    ids = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
    images, anns = [], []
    (root / f"{split}2017").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        name = f"{i:012d}.jpg"
        _photo(rng, 640, 480).save(root / f"{split}2017" / name, quality=90)
        images.append({"id": i + 1, "file_name": name, "width": 640, "height": 480})
        for _ in range(int(rng.integers(2, 8))):
            cx, cy, r = rng.uniform(60, 580), rng.uniform(60, 420), rng.uniform(15, 60)
            angles = np.sort(rng.uniform(0, 2 * np.pi, 8))
            poly = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).clip(0, [639, 479])
            x0, y0 = poly.min(0)
            x1, y1 = poly.max(0)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(rng.choice(ids)),
                         "segmentation": [poly.ravel().round(1).tolist()], "iscrowd": 0,
                         "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                         "area": float((x1 - x0) * (y1 - y0) * 0.7)})
        crowd = np.zeros((480, 640), np.uint8, order="F")
        crowd[300:380, 100:260] = 1
        rle = mask_utils.encode(crowd)
        anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 1,
                     "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()},
                     "bbox": [100.0, 300.0, 160.0, 80.0], "area": float(crowd.sum())})
    path = root / "annotations" / f"instances_{split}2017.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    cats = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in ids]
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def write_ade(root: Path, split: str, n: int, rng) -> None:
    """ADE-like scenes (sizes around 683x512) and masks: 0 = other, 1..150 the classes, as regions."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = [(683, 512), (512, 683), (640, 480), (800, 600)][i % 4]
        _photo(rng, w, h).save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg", quality=90)
        mask = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(mask)
        for _ in range(12):
            x, y = rng.uniform(0, w), rng.uniform(0, h)
            draw.rectangle([x, y, x + rng.uniform(30, w / 2), y + rng.uniform(30, h / 2)],
                           fill=int(rng.integers(1, ADE_CLASSES + 1)))
        mask.save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")


def write_sources(data: Path, images: int) -> None:
    if (data / "done").is_file():
        return
    rng = np.random.default_rng(0)
    print(f"[users scale] writing synthetic sources under {data}", flush=True)
    write_imagefolder(data / "imagenet", classes=10, per_class=max(4, images // 10), rng=rng)
    for split, n in (("train", images), ("val", max(2, images // 4))):
        write_coco(data / "coco", split, n, rng)
        write_ade(data / "ade", "training" if split == "train" else "validation", n, rng)
    (data / "done").write_text("ok")


def users_config(data: Path, batch_scale: float, workers: int, steps: int):
    from xlearner.config import load_config

    b = {"imagenet": 64, "coco": 8, "ade20k": 8}
    over = [
        f"sources.imagenet.root={data}/imagenet/train", f"sources.imagenet.val_root={data}/imagenet/val",
        f"sources.coco.root={data}/coco/train2017",
        f"sources.coco.annotations={data}/coco/annotations/instances_train2017.json",
        f"sources.coco.val_root={data}/coco/val2017",
        f"sources.coco.val_annotations={data}/coco/annotations/instances_val2017.json",
        "sources.coco.image_size=1024",  # keep-ratio: a 640x480 photo at 1024x768 (shorter side near 800)
        f"sources.ade20k.root={data}/ade/images/training", f"sources.ade20k.masks={data}/ade/annotations/training",
        f"sources.ade20k.val_root={data}/ade/images/validation",
        f"sources.ade20k.val_masks={data}/ade/annotations/validation",
        *[f"sources.{n}.batch_size={max(1, round(v * batch_scale))}" for n, v in b.items()],
        f"train.num_workers={workers}", "train.compile=false", f"train.steps={steps}",
        "train.val_batches=1", "train.precise_bn_batches=1", f"train.warmup_steps={steps}",
        "transfer.steps=5", "transfer.seeds=1", "transfer.max_train_samples=16", "transfer.batch_size=2",
        "baselines.imagenet=false",
    ]
    return load_config("imagenet_coco_ade20k", over)


def transfer_each_source(cfg, backbone: Path) -> list[dict]:
    """One transfer per task to the user's own source (scored on its val split: no test split)."""
    from xlearner.bench import peak_memory_mb
    from xlearner.pipeline import load_config_like
    from xlearner.transfer.suite import transfer_one

    out = []
    for s in cfg.sources:
        tcfg = load_config_like(cfg, [f"transfer.image_size={cfg.size_of(s)}"])
        t0 = time.perf_counter()
        r = transfer_one(backbone, s, tcfg, show_progress=False)
        out.append({"source": s.name, "task": s.task, "mode": r["mode"], "image_size": cfg.size_of(s),
                    "s": time.perf_counter() - t0, "score": r["mean"], "peak_memory_mb": peak_memory_mb()})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("runs/users_scale_data"))
    ap.add_argument("--images", type=int, default=24, help="training images per det/seg source (cls: as many)")
    ap.add_argument("--batch-scale", type=float, default=None, help="x the template's batch sizes "
                                                                     "(default 1 on CUDA, 0.125 on CPU)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2, help="steps measured per stage")
    ap.add_argument("--stages-only", action="store_true", help="expansion, squeeze, msmt only (for torchrun)")
    ap.add_argument("--shards", action="store_true", help="only the loaders: the ImageNet- and COCO-like sources "
                                                          "from their files and packed as shards, 0/1/2 workers")
    ap.add_argument("--loader-batches", type=int, default=6, help="with --shards: batches timed per loader")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    import torch

    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        write_sources(args.data, args.images)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # the other ranks wait for the data
        while not (args.data / "done").is_file():
            time.sleep(1)
    scale = args.batch_scale if args.batch_scale is not None else (1.0 if torch.cuda.is_available() else 0.125)
    cfg = users_config(args.data.resolve(), scale, args.workers, args.steps)
    if args.stages_only:
        return stages_only(cfg, args, rank)
    if args.shards:
        return shard_throughput(cfg, args)
    from xlearner.bench import measure, render

    folder = args.data / "bench_run"
    res = measure(cfg, steps=args.steps, loader_batches=2, transfers=False, out=folder)
    res["transfers_to_sources"] = transfer_each_source(cfg, folder / "backbones" / "xlearner.safetensors")
    print(render(res))
    print("\nper stage: backbone parameters and forward GFLOPs per image")
    for st in res["stages"]:
        print(f"  {st['stage']:<12} {st['backbone_params'] or 0:>11,}  "
              + ", ".join(f"{k} {v:.1f}" for k, v in st["gflops_per_image"].items()))
    print("\ntransfers to the users' own sources (one seed, a few steps):")
    for t in res["transfers_to_sources"]:
        print(f"  {t['source']:<10} {t['task']} {t['mode']:<8} {t['image_size']:>5} px {t['s']:>7.1f} s  "
              f"peak {t['peak_memory_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


def shard_throughput(cfg, args, repeats: int = 2) -> int:
    """Images/s of each source's training loader (the template's transforms) from its files and from
    its packed shards, at 0, 1 and 2 workers; files and shards alternate so drift hits both alike."""
    from xlearner.bench import loader_rate
    from xlearner.data.shards import MANIFEST, read_from_shards
    from xlearner.data.sources import pack_source

    rows = []
    for s in cfg.sources[:2]:  # imagenet (cls JPEGs ~500x375), coco (det, 640x480)
        packed_dir = args.data / f"{s.name}.shards"
        if not (packed_dir / MANIFEST).is_file():
            pack_source(s, packed_dir, shard_samples=16)
        packed = read_from_shards(s, packed_dir)
        for workers in (0, 1, 2):
            wcfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_workers": workers})})
            rate = {"files": [], "shards": []}
            for _ in range(repeats):
                for kind, src in (("files", s), ("shards", packed)):
                    rate[kind].append(loader_rate(wcfg, src, args.loader_batches)["images_per_s"])
            files, shards = (float(np.median(rate[k])) for k in ("files", "shards"))
            rows.append({"source": s.name, "task": s.task, "workers": workers, "batch": s.batch_size,
                         "files_images_per_s": files, "shards_images_per_s": shards, "ratio": shards / files})
            print(f"  {s.name:<9} {s.task} workers {workers}: files {files:7.1f} img/s, shards {shards:7.1f} img/s, "
                  f"shards / files {shards / files:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def stages_only(cfg, args, rank: int) -> int:
    """Expansion, squeeze and msmt, each ``--steps`` steps, on every rank (DDP under torchrun)."""
    from xlearner.bench import peak_memory_mb, probe_overrides
    from xlearner.pipeline import build_parts, load_config_like
    from xlearner.stages import train_stage

    folder = args.data / f"ddp_run_{os.environ.get('WORLD_SIZE', 1)}"
    parts = [p for p in build_parts(cfg, folder)[0] if p.kind == "train" and p.stage in ("expansion", "squeeze", "msmt")]
    rows = []
    for p in parts:
        t0 = time.perf_counter()
        info = train_stage(load_config_like(p.cfg, probe_overrides(args.steps)), p.stage, p.path)
        rows.append({"stage": p.name, "wall_s": time.perf_counter() - t0, "step_s": info.get("step_s", 0) / args.steps,
                     "data_wait_s": max(0.0, info.get("fit_s", 0) - info.get("step_s", 0) - info.get("fit_eval_s", 0))
                     / args.steps, "peak_memory_mb": peak_memory_mb()})
    if rank == 0:
        print(f"\n{os.environ.get('WORLD_SIZE', 1)} rank(s): per stage s per step, data wait per step, peak memory (rank 0)")
        for r in rows:
            print(f"  {r['stage']:<10} step {r['step_s']:.2f} s  data {r['data_wait_s']:.2f} s  "
                  f"peak {r['peak_memory_mb']:.0f} MB  (wall {r['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
