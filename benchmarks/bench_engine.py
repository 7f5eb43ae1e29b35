"""Engine overhead: images/s of a plain PyTorch loop vs ``fit`` vs the expansion stage.

Same fixed in-memory batch (a loader that always returns it), same narrow timm ResNet-18
(channels 16-32-64-128, stem 16), 64x64 images, AdamW, fp32 on CPU / bf16 autocast on CUDA
(both the plain loop and the engine), gradient clipping off in both (like for like).

(a) plain: backbone -> global pool -> linear -> cross-entropy -> AdamW step, no engine.
(b) engine: ``fit`` on a one-source msmt-like ``MSMT`` stage (one shared backbone).
(c) expansion: ``fit`` on an ``ExpansionStage`` whose ``ExpandedNet`` has T task branches,
    fed the same cls batch: it runs every branch up to the last reconciliation stage, so
    an image costs about T backbones and the reference is plain/T.

Every measurement builds its model afresh from the same seed (a model trained on and on
over the same batch drifts into denormal values that slow a CPU down). Warm-up excluded everywhere: a separate warm-up run of W steps on the same module, then a
timed run whose first step is excluded too (``FitResult.images_per_s``); the plain loop does
W+1 untimed steps then times the rest. Two figures per method: the best whole-run rate
over the rounds, and batch / median per-step time over all rounds (the engine's step times
are the gaps between its batch requests, bookkeeping included); on a shared, busy CPU the
median step is the steadier one. On CUDA trust the whole-run rate (steps are asynchronous). Rounds rotate the order of the methods (the figure per
method is the median over rounds), so a busy machine biases none of them.

    .venv/bin/python benchmarks/bench_engine.py [--batch 64] [--steps 20] [--rounds 3] [--tasks 3]
"""
from __future__ import annotations

from xlearner.tasks import HeadOptions

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xlearner.config import BackboneConfig, RunConfig, TrainConfig
from xlearner.engine import fit
from xlearner.models.backbone import Backbone
from xlearner.models.nets import ExpandedNet, SourceSpec, TaskHeads
from xlearner.stages.baselines import MSMT, build_shared_net
from xlearner.stages.expansion import ExpansionStage

BACKBONE = BackboneConfig(name="resnet18", kwargs={"channels": [16, 32, 64, 128], "stem_width": 16})
NUM_CLASSES = 10
SOURCE = "src"


class SameBatch:
    """An infinite loader that returns one fixed batch (``{source: batch}``) every step,
    noting the time of every request (the gaps are the engine's per-step times)."""

    def __init__(self, batch: dict) -> None:
        self.batch = batch
        self.stamps: list[float] = []

    def __iter__(self):
        while True:
            self.stamps.append(time.perf_counter())
            yield self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def run_cfg() -> RunConfig:
    return RunConfig(backbone=BACKBONE, sources=[{"name": SOURCE, "task": "cls", "dataset": "x"}])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone(BACKBONE)
        self.fc = nn.Linear(self.backbone.channels[-1], NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x)[-1].mean(dim=(2, 3)))


def plain_images_per_s(images, labels, steps: int, warmup: int, device) -> tuple[float, list[float]]:
    torch.manual_seed(0)
    model = Plain().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # like the engine's
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step() -> None:
        with amp:
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup + 1):
        step()
    sync(device)
    t = t0 = time.perf_counter()
    step_s = []
    for _ in range(steps - 1):
        step()
        now = time.perf_counter()
        step_s.append(now - t)
        t = now
    sync(device)
    return (steps - 1) * images.shape[0] / (time.perf_counter() - t0), step_s


def fit_images_per_s(module: nn.Module, batch: dict, steps: int, warmup: int, device) -> tuple[float, list[float]]:
    cfg = TrainConfig(steps=steps, lr=1e-3, warmup_steps=0, clip_grad=None, log_every=10,
                      ckpt_every=10**6, progress=False)
    with tempfile.TemporaryDirectory() as d:
        fit(module, SameBatch(batch), cfg.model_copy(update={"steps": warmup}), Path(d) / "warm", device=device)
        loader = SameBatch(batch)
        res = fit(module, loader, cfg, Path(d) / "timed", device=device)
    gaps = [b - a for a, b in zip(loader.stamps[1:], loader.stamps[2:])]  # steps 2..N-1
    return res.images_per_s, gaps


def expansion_module(num_tasks: int) -> nn.Module:
    spec = SourceSpec(SOURCE, "cls", NUM_CLASSES)
    probe = Backbone(BACKBONE)
    heads = TaskHeads([spec], probe.channels, probe.strides, HeadOptions(fpn_channels=64))
    tasks = ["cls", "det", "seg"][:num_tasks]
    net = ExpandedNet(BACKBONE, tasks, heads, reconcile_after=[1, 2, 3], detach_others=True)
    return ExpansionStage(run_cfg(), [spec], net)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement (first one excluded)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=3, help="T: task branches of the expanded model (2 or 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, 64, 64, generator=g).to(device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g).to(device)
    batch = {SOURCE: {"images": images, "labels": labels}}

    def msmt() -> nn.Module:
        torch.manual_seed(0)
        spec = SourceSpec(SOURCE, "cls", NUM_CLASSES)
        return MSMT(run_cfg(), [spec], build_shared_net(run_cfg(), [spec]))

    def expn() -> nn.Module:
        torch.manual_seed(0)
        return expansion_module(args.tasks)

    res: dict[str, list[float]] = {"plain": [], "engine": [], "expansion": []}
    step_s: dict[str, list[float]] = {k: [] for k in res}
    measure = {
        "plain": lambda: plain_images_per_s(images, labels, args.steps, args.warmup, device),
        "engine": lambda: fit_images_per_s(msmt(), batch, args.steps, args.warmup, device),
        "expansion": lambda: fit_images_per_s(expn(), batch, args.steps, args.warmup, device),
    }
    order = list(measure)
    for r in range(args.rounds):
        for name in order[r % 3:] + order[:r % 3]:  # rotate who goes first
            rate, gaps = measure[name]()
            res[name].append(rate)
            step_s[name].extend(gaps)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in res.items()), flush=True)

    best = {k: max(v) for k, v in res.items()}
    per_step = {k: args.batch / statistics.median(v) for k, v in step_s.items()}
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\ndevice: {dev}; batch {args.batch} x 3x64x64; resnet18 channels 16-32-64-128 stem 16; "
          f"{args.steps} steps/measurement (first excluded), warm-up {args.warmup}, {args.rounds} rounds")
    print("images/s as: best run of the rounds (whole-run rate) | batch / median step time (all rounds' steps)")
    labels_ = {"plain": "(a) plain PyTorch loop", "engine": "(b) engine fit, msmt-like",
               "expansion": f"(c) expansion, T={args.tasks} branches"}
    for k in res:
        print(f"{labels_[k]:32s} {best[k]:9.1f} | {per_step[k]:9.1f}")
    for stat, v in (("best run", best), ("median step", per_step)):
        r_engine = v["engine"] / v["plain"]
        r_exp = v["expansion"] / (v["plain"] / args.tasks)
        print(f"[{stat:11s}] engine/plain = {r_engine:.3f} ({'ok' if r_engine >= 0.9 else 'BELOW'} >= 0.9); "
              f"expansion/(plain/T) = {r_exp:.3f} ({'ok' if r_exp >= 0.9 else 'BELOW'} >= 0.9)")

if __name__ == "__main__":
    main()
