"""Stage throughput: images/s of each stage's training step against a plain cls loop on the same images.

For msst_cls, msst_det, msst_seg, msmt, expansion and squeeze, one fixed in-memory batch of
the preset's shapes (per source: its batch size and image size; det: 2-6 random boxes per
image, seg: random masks) is trained on: the stage module's losses, weighted sum, backward,
gradient clipping (if the preset clips), optimizer step; the same precision and memory format
as the engine (bf16 autocast + channels_last on CUDA as the preset says, fp32 on CPU).

The reference ("plain") is the same backbone on the same images with the cls head only
(global pool -> linear -> cross-entropy), same optimizer, same precision, and
``ratio = stage images/s / plain images/s`` (1.0: the stage costs what the backbone costs;
0.67: its step takes 1.5x the plain step). Expansion runs T
task backbones on every image up to the last reconciliation stage, so its reference is
plain / T (the ratio printed for it is against plain / T).

Figures are the median per-step time over all timed steps (robust on a busy shared CPU); on
the CPU a stage and its plain reference alternate step by step, so load from other processes
hits both alike; on CUDA each timed window of ``--steps`` steps is synchronised at its ends and
the median window is used. Rounds rotate the order of the stages.

    python benchmarks/bench_stages.py [--preset default] [--steps 10] [--rounds 3] [--stages msst_det,...]
    python benchmarks/bench_stages.py --profile msst_det   # torch.profiler table of one stage's step
    python benchmarks/bench_stages.py --preset gpu --count-ops train.amp=bf16   # operators per step
    python benchmarks/bench_stages.py --preset gpu --graph-breaks   # graphs and breaks per stage under torch.compile
    python benchmarks/bench_stages.py --preset gpu train.compile=true   # stage and plain through torch.compile
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from xlearner.config import RunConfig, load_config
from xlearner.engine.trainer import _autocast_dtype, build_optimizer, move_to_device, prepare_module
from xlearner.models.nets import SourceSpec

STAGES = ("msst_cls", "msst_det", "msst_seg", "msmt", "expansion", "squeeze")
NUM_CLASSES = {"cls": 10, "det": 20, "seg": 21}


def fake_batch(cfg: RunConfig, sources, seed: int = 0, plain: bool = False) -> dict:
    """One in-memory batch per source at the preset's batch and image sizes (CPU tensors)."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for s in sources:
        n, size = s.batch_size, cfg.size_of(s)
        images = torch.randn(n, 3, size, size, generator=g)
        k = NUM_CLASSES[s.task]
        if plain:  # the reference: the same images with cls labels
            batch[s.name] = {"images": images, "cls_labels": torch.randint(0, NUM_CLASSES["cls"], (n,), generator=g)}
        elif s.task == "cls":
            batch[s.name] = {"images": images, "labels": torch.randint(0, k, (n,), generator=g)}
        elif s.task == "det":
            targets = []
            for _ in range(n):
                m = int(torch.randint(2, 7, (1,), generator=g))
                wh = size * (0.15 + 0.35 * torch.rand(m, 2, generator=g))
                xy = (size - wh) * torch.rand(m, 2, generator=g)
                targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                                "labels": torch.randint(0, k, (m,), generator=g)})
            try:  # the training loader's padded layout where this code has it
                from xlearner.models.heads import pad_targets

                boxes, labels = pad_targets(targets, torch.device("cpu"))
                batch[s.name] = {"images": images, "boxes": boxes, "labels": labels}
            except ImportError:
                batch[s.name] = {"images": images, "targets": targets}
        else:
            masks = torch.randint(0, k, (n, size, size), generator=g)
            masks[:, : size // 8] = 255  # some ignored pixels, like a padded border
            batch[s.name] = {"images": images, "masks": masks}
    return batch


class Plain(nn.Module):
    """Backbone -> global pool -> linear -> cross-entropy on every source batch's images."""

    def __init__(self, cfg: RunConfig):
        super().__init__()
        from xlearner.models.backbone import Backbone

        self.backbone = Backbone(cfg.backbone)
        self.fc = nn.Linear(self.backbone.channels[-1], NUM_CLASSES["cls"])

    def forward(self, batch: dict) -> dict:
        out = {}
        for name, b in batch.items():
            logits = self.fc(self.backbone(b["images"])[-1].mean(dim=(2, 3)))
            out[name] = F.cross_entropy(logits, b["cls_labels"])
        return out


def stage_sources(cfg: RunConfig, stage: str) -> list:
    if stage.startswith("msst_"):
        task = stage[5:]
        return [s for s in cfg.sources if s.task == task]
    return list(cfg.sources)


def build(cfg: RunConfig, stage: str, sources) -> nn.Module:
    specs = [SourceSpec(s.name, s.task, NUM_CLASSES[s.task]) for s in sources]
    torch.manual_seed(cfg.seed)
    if stage == "plain":
        return Plain(cfg)
    if stage == "expansion":
        from xlearner.stages.expansion import ExpansionStage

        return ExpansionStage.build(cfg, specs)
    if stage == "squeeze":
        from xlearner.stages.expansion import build_expanded_net
        from xlearner.stages.squeeze import SqueezeStage

        teacher = build_expanded_net(cfg, specs)  # random weights: the cost is what is measured
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        return SqueezeStage(cfg, specs, teacher)
    from xlearner.stages.baselines import MSMT

    return MSMT.build(cfg, specs)  # msst_* and msmt: one shared backbone, the sources differ


class Runner:
    """One module, its optimizer and its fixed batch, stepped like the engine steps it."""

    def __init__(self, cfg: RunConfig, stage: str, sources, device: torch.device):
        self.cfg, self.device = cfg, device
        self.module = build(cfg, stage, sources)
        self.channels_last = device.type == "cuda" and cfg.train.channels_last
        amp = _autocast_dtype(cfg.train.amp, device)
        prepare_module(self.module, device, self.channels_last, amp)  # as the engine does
        # train.compile=true: the forward (and so its backward) through torch.compile, as the engine does
        self.forward = torch.compile(self.module, mode=cfg.train.compile_mode) if cfg.train.compile else self.module
        self.opt = build_optimizer(self.module, cfg.train, device)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        batch = fake_batch(cfg, sources, plain=stage == "plain")
        if hasattr(self.module, "target_encoders"):  # what the training loader's workers add (FCOS's matching)
            encoders = self.module.target_encoders({s.name: cfg.size_of(s) for s in sources})
            batch = {name: encoders[name](b) if name in encoders else b for name, b in batch.items()}
        self.batch = move_to_device(batch, device, self.channels_last)
        self.images = sum(int(b["images"].shape[0]) for b in self.batch.values())
        self.autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext
        self.step_s: list[float] = []
        self.cpu_clock = False

    def step(self) -> None:
        with self.autocast():
            losses = self.forward(self.batch)
        total = sum(v.float() for v in losses.values())
        total.backward()
        if self.cfg.train.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.clip_grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, steps: int, timed: bool = True) -> None:
        sync(self.device)
        if self.device.type == "cuda":  # one synchronised window: steps are asynchronous
            t0 = time.perf_counter()
            for _ in range(steps):
                self.step()
            sync(self.device)
            if timed:
                self.step_s.append((time.perf_counter() - t0) / steps)
            return
        clock = time.thread_time if self.cpu_clock else time.perf_counter
        for _ in range(steps):
            t0 = clock()
            self.step()
            if timed:
                self.step_s.append(clock() - t0)

    def images_per_s(self) -> float:
        return self.images / statistics.median(self.step_s)


def build_pairs(cfg: RunConfig, stages: list[str], device: torch.device) -> dict[str, tuple[Runner, Runner]]:
    """Each stage's runner beside its plain reference on the same images (stages without sources skipped)."""
    pairs = {}
    for st in stages:
        src = stage_sources(cfg, st)
        if not src:
            print(f"{st}: the preset has no source for it; skipped")
            continue
        pairs[st] = (Runner(cfg, st, src, device), Runner(cfg, "plain", src, device))
    return pairs


def branches(stage: str, runner: Runner) -> int:
    """T for expansion (it runs T task backbones per image: its reference is plain / T), else 1."""
    return len(runner.module.net.tasks) if stage == "expansion" else 1


def seg_loss_ms(runner: Runner, repeats: int) -> float:
    """Median ms of the seg loss alone (forward + backward): the seg head's logits at its finest
    stride, scored as ``SegTask.loss`` does (resized to the image and cross-entropy per pixel, or
    with ``seg_loss_points`` the cross-entropy on that many sampled pixels per image).

    Every seg step pays it on top of the backbone, whatever its neck and head, so
    ``plain / (plain + loss)`` is about the best ratio a seg head that cost nothing could reach.
    """
    from xlearner.tasks import head_seg_loss

    net = runner.module.net
    name, b = next(iter(runner.batch.items()))
    head = net.task_heads.heads[name]
    n, _, h, w = b["images"].shape
    stride = min(net.backbone.strides)
    logits = torch.randn(n, NUM_CLASSES["seg"], h // stride, w // stride, device=runner.device, requires_grad=True)
    times = []
    for i in range(repeats + 3):
        sync(runner.device)
        t0 = time.perf_counter()
        with runner.autocast():
            loss = head_seg_loss(head, logits, b["masks"])
        loss.float().backward()
        sync(runner.device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile(cfg: RunConfig, stage: str, device: torch.device, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile as tprofile

    src = stage_sources(cfg, stage) if stage != "plain" else [s for s in cfg.sources if s.task == "det"]
    r = Runner(cfg, stage, src, device)
    r.run(3, timed=False)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        r.run(steps, timed=False)
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=30))


# operators that only make views or allocate: no kernel runs for them on a GPU
VIEW_OPS = frozenset({"detach", "view", "_unsafe_view", "alias", "select", "slice", "narrow", "unsqueeze", "squeeze",
                      "permute", "t", "transpose", "expand", "as_strided", "unbind", "split", "split_with_sizes",
                      "chunk", "reshape", "flatten", "unfold", "diagonal", "empty", "empty_like", "new_empty",
                      "empty_strided", "lift_fresh"})


def count_ops(runner: Runner) -> tuple[int, collections.Counter]:
    """Operators one training step dispatches (forward, backward, clipping, optimizer), views excluded.

    Where a GPU step is launch-bound (small batches), its time follows this count, not the
    arithmetic: a CPU-measurable, noise-free proxy for the GPU step ratio."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with Count() as c:
        runner.step()
    kernels = collections.Counter({k: v for k, v in c.ops.items() if k not in VIEW_OPS})
    return sum(kernels.values()), kernels


def print_op_counts(cfg: RunConfig, stages: list[str], device: torch.device) -> None:
    print(f"bench_stages --count-ops: preset {cfg.name}, precision {_autocast_dtype(cfg.train.amp, device) or 'fp32'}; "
          "operators per training step, views excluded (the count does not depend on batch or image size, "
          "except through the det levels a size gives)")
    print(f"{'stage':<10} {'stage ops':>9} {'plain ops':>9}  ratio  most frequent in the stage")
    for st, (a, b) in build_pairs(cfg, stages, device).items():
        a.run(2, timed=False)
        b.run(2, timed=False)
        (na, ops), (nb, _) = count_ops(a), count_ops(b)
        t = branches(st, a)
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(5))
        print(f"{st:<10} {na:>9d} {nb:>9d}  {nb * t / na:.2f}{' (vs plain/%d)' % t if t > 1 else ''}  {top}")


def graph_breaks(runner: Runner) -> tuple[int, int, list[str]]:
    """Graphs and graph breaks of the stage's forward and loss as the engine compiles it
    (``torch.compile(module)``; the backward follows the forward's graph through AOTAutograd), and
    the first break reasons: 1 graph and 0 breaks is what ``fullgraph=True`` needs."""
    torch._dynamo.reset()
    with runner.autocast():  # as the engine runs it: a bf16 preset's frozen teacher is cast for autocast
        ex = torch._dynamo.explain(lambda batch: sum(runner.module(batch).values()))(runner.batch)
    return ex.graph_count, ex.graph_break_count, [str(r.reason).splitlines()[0] for r in ex.break_reasons[:3]]


def print_graph_breaks(cfg: RunConfig, stages: list[str], device: torch.device) -> None:
    print(f"bench_stages --graph-breaks: preset {cfg.name}; each stage's forward and loss traced by torch._dynamo.explain")
    print(f"{'stage':<10} {'graphs':>6} {'breaks':>6}  reasons")
    for st, (a, _) in build_pairs(cfg, stages, device).items():
        graphs, breaks, reasons = graph_breaks(a)
        print(f"{st:<10} {graphs:>6d} {breaks:>6d}  {'; '.join(reasons) or '-'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--profile", default=None, help="print a torch.profiler table of one stage (or 'plain' on the det images) instead")
    ap.add_argument("--count-ops", action="store_true",
                    help="print the operators one step dispatches, stage against plain, instead of timing")
    ap.add_argument("--graph-breaks", action="store_true",
                    help="print each stage's graphs and graph breaks under torch.compile (torch._dynamo.explain)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="CPU only: 'cpu' times steps by this thread's CPU time (with 1 thread: robust to "
                         "other processes on a shared machine; images/s are then per CPU-second)")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. train.amp=fp32")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # a model trained on one batch drifts into denormals
    else:
        torch.backends.cudnn.benchmark = True
    cfg = load_config(args.preset, args.overrides, check_files=False)
    stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise SystemExit(f"unknown stages {bad}; choose from {STAGES}")
    if args.profile:
        profile(cfg, args.profile, device, args.steps)
        return
    if args.count_ops:
        print_op_counts(cfg, stages, device)
        return
    if args.graph_breaks:
        print_graph_breaks(cfg, stages, device)
        return

    runners = build_pairs(cfg, stages, device)
    for pair in runners.values():
        for r in pair:
            r.cpu_clock = args.clock == "cpu" and device.type == "cpu"
    for a, b in runners.values():
        a.run(args.warmup, timed=False)
        b.run(args.warmup, timed=False)
    order = list(runners)
    for r in range(args.rounds):
        k = r % len(order)
        for st in order[k:] + order[:k]:
            a, b = runners[st]
            (a, b) = (a, b) if r % 2 == 0 else (b, a)
            if device.type == "cuda":
                a.run(args.steps)
                b.run(args.steps)
            else:  # step by step, alternating: the other processes' load hits both alike
                for _ in range(args.steps):
                    a.run(1)
                    b.run(1)

    amp = _autocast_dtype(cfg.train.amp, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"bench_stages: preset {cfg.name}, {name}, torch {torch.__version__}, precision {amp or 'fp32'}, "
          f"channels_last {device.type == 'cuda' and cfg.train.channels_last}, compile {cfg.train.compile and cfg.train.compile_mode}, "
          f"{args.rounds} rounds x {args.steps} steps (median step, "
          f"{'thread CPU time' if args.clock == 'cpu' and device.type == 'cpu' else 'wall time'})")
    print(f"{'stage':<10} {'images/step':>11} {'stage img/s':>12} {'plain img/s':>12} {'stage ms':>9} "
          f"{'plain ms':>9}  ratio")
    rows = {}
    for st, (a, b) in runners.items():
        t = branches(st, a)
        ratio = a.images_per_s() / (b.images_per_s() / t)
        rows[st] = {"images_per_step": a.images, "images_per_s": a.images_per_s(),
                    "plain_images_per_s": b.images_per_s(), "step_ms": 1e3 * statistics.median(a.step_s),
                    "plain_step_ms": 1e3 * statistics.median(b.step_s), "ratio": ratio,
                    "reference": "plain" if t == 1 else f"plain/{t}"}
        print(f"{st:<10} {a.images:>11d} {a.images_per_s():>12.1f} {b.images_per_s():>12.1f} "
              f"{rows[st]['step_ms']:>9.1f} {rows[st]['plain_step_ms']:>9.1f}  {ratio:.2f}"
              + (f" (vs plain/{t})" if t > 1 else ""))
    if "msst_seg" in runners:
        plain_ms = rows["msst_seg"]["plain_step_ms"]
        loss_ms = seg_loss_ms(runners["msst_seg"][0], args.rounds * args.steps)
        rows["msst_seg"]["loss_ms"] = loss_ms
        points = next(iter(runners["msst_seg"][0].module.net.task_heads.heads.values())).loss_points
        what = f"CE on {points} sampled pixels per image" if points else "resize + per-pixel CE"
        print(f"msst_seg: its loss alone ({what}, fwd + bwd) takes {loss_ms:.1f} ms: a seg head "
              f"that cost nothing would reach a ratio of about {plain_ms / (plain_ms + loss_ms):.2f}")
    print("ratios (stage images/s / reference images/s): "
          + ", ".join(f"{st} {v['ratio']:.2f}" for st, v in rows.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": cfg.name, "device": name, "torch": torch.__version__, "stages": rows}, f, indent=2)


if __name__ == "__main__":
    main()
