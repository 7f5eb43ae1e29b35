"""Opening data of real size, and JPEG throughput against torchvision's ImageFolder DataLoader.

1. A synthetic COCO annotation file the size of instances_train2017 (118,287 images, 860,001
   boxes with small polygons, 1% crowds; image files are empty stubs: opening never decodes):
   time and peak memory of ``CocoSource`` opening it, cold and again (index cache).
2. An ImageFolder of 100,000 empty stub files in 1,000 class folders: the same for
   ``ImageFolderSource``.
3. 2,000 JPEGs of 200-500 px in 10 folders, RandomResizedCrop 224 + flip: images per second of
   ``MultiSourceLoader`` (the training path) vs a torchvision ``ImageFolder`` + ``DataLoader``
   with the same transforms, with 0, 1 and 2 workers (0 workers: also per CPU second, a clock a
   busy machine does not distort).
Each opening runs in a fresh process, so its peak memory (ru_maxrss) is its own. Files go to a
temporary folder (``--tmp``) and are deleted at the end. Not part of the test suite. Usage:
    python benchmarks/bench_real_data.py [--images 118287] [--boxes 860001] [--files 100000]
        [--jpegs 2000] [--batches 12] [--repeat 3] [--skip-open] [--skip-jpeg]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


# ----------------------------------------------------------------------------- writing the data
def write_coco(folder: Path, n_images: int, n_boxes: int, seed: int = 0) -> Path:
    """COCO-shaped JSON (images, annotations with bbox/area/iscrowd/polygon, 80 categories) + stub files."""
    rng = np.random.default_rng(seed)
    img_dir = folder / "train2017"
    img_dir.mkdir(parents=True)
    cats = [{"id": i + 1 + i // 10, "name": f"category {i}", "supercategory": "thing"} for i in range(80)]
    widths = rng.integers(200, 641, n_images)
    heights = rng.integers(200, 641, n_images)
    images = []
    for i in range(n_images):
        name = f"{i + 1:012d}.jpg"
        (img_dir / name).touch()
        images.append({"id": i + 1, "file_name": name, "width": int(widths[i]), "height": int(heights[i]),
                       "license": 1, "date_captured": "2013-11-14 11:18:45"})
    owner = rng.integers(0, n_images, n_boxes)
    cat_ids = np.array([c["id"] for c in cats])[rng.integers(0, 80, n_boxes)].tolist()
    w, h = widths[owner].astype(float), heights[owner].astype(float)
    bw = np.maximum(1.0, rng.random(n_boxes) * w / 2)
    bh = np.maximum(1.0, rng.random(n_boxes) * h / 2)
    x, y = rng.random(n_boxes) * (w - bw), rng.random(n_boxes) * (h - bh)
    boxes = np.round(np.stack([x, y, bw, bh], 1), 2).tolist()
    polys = np.round(np.stack([x, y, x + bw, y, x + bw, y + bh, x, y + bh, x + bw / 2, y + bh / 2], 1), 2).tolist()
    areas = np.round(0.7 * bw * bh, 2).tolist()
    owner = owner.tolist()
    anns = [{"id": k + 1, "image_id": owner[k] + 1, "category_id": cat_ids[k], "bbox": boxes[k], "area": areas[k],
             "iscrowd": int(k % 100 == 0), "segmentation": [polys[k]]} for k in range(n_boxes)]
    path = folder / "instances_train2017.json"
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns,
                                "categories": cats}))
    return path


def write_stub_folder(folder: Path, n_files: int, n_classes: int = 1000) -> Path:
    n_classes = max(1, min(n_classes, n_files))
    per = -(-n_files // n_classes)
    made = 0
    for c in range(n_classes):
        d = folder / f"n{c:08d}"
        d.mkdir(parents=True)
        for j in range(min(per, n_files - made)):
            (d / f"n{c:08d}_{j}.JPEG").touch()
        made += min(per, n_files - made)
    return folder


def write_jpegs(folder: Path, n: int, classes: int = 10, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(200, 501, 2))
        d = folder / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        # smooth content (JPEG of noise is unrealistically large and slow to decode)
        base = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        img.save(d / f"{i}.jpg", quality=90)
    return folder


# ----------------------------------------------------------------------------- opening (child process)
def open_child(kind: str, path: str) -> None:
    """Runs in a fresh process: open the source, print JSON with seconds and peak MB."""
    from xlearner.config import SourceConfig
    from xlearner.data.readers import CocoSource, ImageFolderSource

    import torch  # noqa: F401  (imported before the clock starts and counted in the baseline)

    base_mb = peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    if kind == "coco":
        cfg = SourceConfig(name="coco", task="det", format="coco", root=Path(path).parent / "train2017",
                           annotations=path, val_fraction=0.0)
        ds = CocoSource(cfg, "train")
        extra = {"boxes": int(sum(len(r.target["boxes"]) for r in ds.records)), "crowd": ds.num_crowd}
    else:
        ds = ImageFolderSource(SourceConfig(name="folder", task="cls", format="imagefolder", root=path,
                                            val_fraction=0.0), "train")
        extra = {"classes": ds.num_classes}
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_mb = peak_rss_mb()
    print(json.dumps({"records": len(ds), "seconds": round(dt, 2), "cpu_seconds": round(cpu, 2),
                      "peak_mb": round(peak_mb), "import_mb": round(base_mb), **extra}))


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_open(kind: str, path: Path, home: Path) -> dict:
    env = {**os.environ, "XLEARNER_HOME": str(home)}  # the index cache goes to the temporary folder
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(path)], capture_output=True, text=True,
                         env=env)
    if out.returncode:
        raise RuntimeError(f"opening {kind} {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- JPEG throughput
def ours_per_second(root: Path, batches: int, batch_size: int, workers: int) -> float:
    from xlearner.config import AugmentConfig, SourceConfig
    from xlearner.data.loader import MultiSourceLoader
    from xlearner.data.sources import build_source
    from xlearner.data.transforms import build_transform

    ds = build_source(SourceConfig(name="jpeg", task="cls", format="imagefolder", root=root, val_fraction=0.0))
    tf = build_transform("cls", 224, True, AugmentConfig(random_resized_crop=(0.08, 1.0), hflip=True))
    loader = MultiSourceLoader({"jpeg": ds}, {"jpeg": batch_size}, {"jpeg": tf}, {"jpeg": "cls"}, seed=0,
                               num_workers=workers)
    try:
        return _images_per_second(lambda: next(loader), batches, batch_size)
    finally:
        loader.close()


def torchvision_per_second(root: Path, batches: int, batch_size: int, workers: int) -> float:
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    tf = v2.Compose([v2.RandomResizedCrop(224, scale=(0.08, 1.0), antialias=True), v2.RandomHorizontalFlip(),
                     v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    loader = DataLoader(ImageFolder(str(root), transform=tf), batch_size=batch_size, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                        generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    return _images_per_second(lambda: next(it), batches, batch_size)


def _images_per_second(next_batch, batches: int, batch_size: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) after 2 warm-up batches."""
    for _ in range(2):
        next_batch()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next_batch()
    n = batches * batch_size
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=118_287)
    ap.add_argument("--boxes", type=int, default=860_001)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--jpegs", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tmp", type=Path, default=None, help="parent folder for the data (default: system temp)")
    ap.add_argument("--skip-open", action="store_true")
    ap.add_argument("--skip-jpeg", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        open_child(*args.child)
        return
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="xlearner_bench_real_", dir=args.tmp))
    try:
        if not args.skip_open:
            t0 = time.perf_counter()
            ann = write_coco(work / "coco", args.images, args.boxes)
            print(f"wrote COCO file: {args.images} images, {args.boxes} boxes, "
                  f"{ann.stat().st_size / 1e6:.0f} MB in {time.perf_counter() - t0:.0f} s", flush=True)
            from xlearner.data.readers import INDEX_CACHE_MIN_BYTES

            cached = ann.stat().st_size >= INDEX_CACHE_MIN_BYTES
            runs = ("first open (parse, writes the index cache)", "second open (index cache)") if cached else (
                "first open", "second open (file under the index cache's size threshold: parsed again)")
            for run in runs:
                r = measure_open("coco", ann, work / "home")
                print(f"COCO {run}: {r['records']} images, {r['boxes']} boxes ({r['crowd']} crowd kept for "
                      f"scoring) in {r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU, peak "
                      f"{r['peak_mb']} MB ({r['import_mb']} MB after imports)", flush=True)
            t0 = time.perf_counter()
            folder = write_stub_folder(work / "folder", args.files)
            print(f"wrote ImageFolder: {args.files} files in {time.perf_counter() - t0:.0f} s", flush=True)
            for run in ("first open", "second open"):
                r = measure_open("folder", folder, work / "home")
                print(f"ImageFolder {run}: {r['records']} files, {r['classes']} classes in {r['seconds']:.2f} s "
                      f"wall, {r['cpu_seconds']:.2f} s CPU, peak {r['peak_mb']} MB ({r['import_mb']} MB after "
                      f"imports)", flush=True)
        if not args.skip_jpeg:
            jpegs = write_jpegs(work / "jpeg", args.jpegs)
            for rep in range(args.repeat):  # alternate, so a busy machine slows both alike
                for workers in (0, 1, 2):
                    ours, ours_cpu = ours_per_second(jpegs, args.batches, args.batch_size, workers)
                    tv, tv_cpu = torchvision_per_second(jpegs, args.batches, args.batch_size, workers)
                    # 0 workers: all the work is in this process, so its CPU time is a fair clock on a busy machine
                    cpu = (f"; per CPU second: xlearner {ours_cpu:.0f}, torchvision {tv_cpu:.0f}, ratio "
                           f"{ours_cpu / tv_cpu:.2f}") if workers == 0 else ""
                    print(f"JPEG RandomResizedCrop 224 + flip, run {rep + 1}, {workers} worker(s): xlearner "
                          f"{ours:.0f} img/s, torchvision ImageFolder {tv:.0f} img/s, ratio {ours / tv:.2f}{cpu}",
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
