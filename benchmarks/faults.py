"""Kill -9 and resume: N random kills of a short CPU training run, each resumed and compared.

    python benchmarks/faults.py --tries 10            # each run a forked child of this process
    python benchmarks/faults.py --tries 3 --spawn     # each run a fresh `python -m xlearner.cli`
    python benchmarks/faults.py --bad-inputs          # the bad-input table (data check, train error/skip)
    python benchmarks/faults.py --elastic --tries 3   # torchrun restarts after one rank is SIGKILLed
    python benchmarks/faults.py --shards ...          # either, with both sources read from packed shards

A reference run trains a tiny two-source config (cls ImageFolder + det COCO, augmentation on,
a checkpoint every step, validation every 8 steps) without interruption. Each try starts the
same run, kills it with SIGKILL at a random moment of one of three kinds - ``before`` the first
checkpoint, ``during`` a checkpoint write (as soon as its temporary file appears), or
``between`` writes (a random delay after a step was logged) - checks that the checkpoint left
behind loads with ``weights_only=True``, resumes it with ``--resume`` and compares the losses of
every step and the final weights with the reference (exact equality). It prints, per try, the
kill and the result, then: tries, resumed, matched, stale files (temporary files left in the
run folder after the resume).

``--elastic``: the same stage under ``torchrun --standalone --nproc_per_node 2 --max-restarts 3``
(gloo, CPU). Each try SIGKILLs one rank (rank 0 or 1 in turn) after a random number of logged
steps; torchrun restarts the worker group, whose workers see ``TORCHELASTIC_RESTART_COUNT`` > 0
and resume from the last checkpoint (taking over the killed run's folder lock); the losses and
final weights are compared with an uninterrupted two-rank run. It prints tries, resumed, identical.

By default every run is a forked child of this already-imported process (``cli.main`` then
``os._exit``), so a try costs a few seconds, not two interpreter start-ups; ``--spawn`` runs
the real command line in fresh interpreters instead.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

STEPS = 16


def write_config(root: Path, shards: bool = False) -> Path:
    """Tiny data (16 px) and a config that checkpoints every step; with ``shards``, both sources are
    packed (`xlearner data pack`, 4 records a shard) and read from their shards."""
    import numpy as np
    import yaml
    from PIL import Image

    import fault_cases as fc

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for i in range(12):
            img = rng.integers(0, 80, (fc.SIZE, fc.SIZE, 3), dtype=np.uint8)
            img[4:12, 4:12, 0 if c == "a" else 2] = 220
            (root / "cls" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / "cls" / c / f"{i}.png")
    det = fc._coco(root / "det", {}, n=10)
    cls = fc._cls(root / "cls")
    data = fc.run_config(cls, "error", steps=STEPS)
    data["augment"] = {"cls": {"random_resized_crop": [0.6, 1.0]}, "det": {"hflip": True},
                       "seg": {"random_resized_crop": None, "hflip": False}}
    data["sources"] = [{**cls, "name": "shapes", "batch_size": 4, "val_fraction": 0.2},
                       {**det, "name": "boxes", "batch_size": 2, "val_fraction": 0.2}]
    data["train"].update(ckpt_every=1, val_every=8, log_every=1)
    if shards:
        from xlearner.config import SourceConfig
        from xlearner.data.sources import pack_source

        for i, src in enumerate(data["sources"]):
            pack_source(SourceConfig(**src), root / f"{src['name']}.shards", shard_samples=4, echo=lambda _: None)
            data["sources"][i] = {k: src[k] for k in ("name", "task", "batch_size")}
            data["sources"][i].update(format="shards", root=str(root / f"{src['name']}.shards"))
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


class Run:
    """One `xlearner train` run, as a forked child or a fresh interpreter."""

    def __init__(self, config: Path, out: Path, resume: bool, spawn: bool):
        argv = ["train", str(config), "--stage", "msmt", "--out", str(out)] + (["--resume"] if resume else [])
        self.out = out
        self.log = open(out.parent / f"{out.name}{'.resume' if resume else ''}.console", "w")
        if spawn:
            env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
            self.proc = subprocess.Popen([sys.executable, "-m", "xlearner.cli", *argv], stdout=self.log,
                                         stderr=subprocess.STDOUT, env=env)
            self.pid = self.proc.pid
        else:
            self.proc = None
            self.pid = os.fork()
            if self.pid == 0:  # the child: the real command line, then leave without cleanup handlers
                code = 1
                try:
                    os.dup2(self.log.fileno(), 1)
                    os.dup2(self.log.fileno(), 2)
                    from xlearner.cli import main

                    code = main(argv)
                finally:
                    os._exit(code)

    def poll(self) -> int | None:
        if self.proc is not None:
            return self.proc.poll()
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        return None if pid == 0 else os.waitstatus_to_exitcode(status)

    def wait(self) -> int:
        code = self.proc.wait() if self.proc is not None else os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        self.log.close()
        return code

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


def logged_steps(out: Path) -> int:
    try:
        lines = (out / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith("}") and '"total"' in line)


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob(".*") if p.is_file() and ".tmp" in p.name]


def results(out: Path) -> tuple[dict[int, float], dict, dict]:
    """(step -> total loss, val records, final weights)."""
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    losses = {r["step"]: r["total"] for r in rows if "total" in r}
    vals = {r["step"]: r["val"] for r in rows if "val" in r}
    return losses, vals, load_file(str(out / "model.safetensors"))


def kill_run(config: Path, out: Path, kind: str, rng: random.Random, spawn: bool, step_s: float) -> str:
    """Start a run and SIGKILL it at a moment of the given kind; describe where it was killed."""
    run = Run(config, out, resume=False, spawn=spawn)
    ckpt_dir = out / "checkpoints"
    t0 = time.perf_counter()
    target = rng.randint(1, STEPS - 2)
    note = ""
    while run.poll() is None:
        if kind == "before":
            if time.perf_counter() - t0 >= rng.uniform(0.0, 1.0) or (ckpt_dir / "last.pt").exists():
                note = "before the first checkpoint" if not (ckpt_dir / "last.pt").exists() else "after step 1"
                break
        elif kind == "during":
            if logged_steps(out) >= target and ckpt_dir.is_dir() and any(
                    p.name.endswith(".tmp") for p in os.scandir(ckpt_dir)):
                note = f"during a checkpoint write after step {logged_steps(out)}"
                break
        elif logged_steps(out) >= target:
            time.sleep(rng.uniform(0.0, step_s))
            note = f"between writes, {logged_steps(out)} steps logged"
            break
        time.sleep(0.0002)
    else:
        run.wait()
        return "finished before the kill"
    run.kill()
    run.wait()
    left = temp_files(out)
    return note + (f" (left {len(left)} temp file(s))" if left else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tries", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spawn", action="store_true", help="fresh interpreters instead of forked children")
    ap.add_argument("--bad-inputs", action="store_true", help="print the bad-input table instead")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--elastic", action="store_true", help="kill one rank of a torchrun group instead")
    ap.add_argument("--shards", action="store_true", help="read both sources from packed shards (format: shards)")
    args = ap.parse_args()
    if args.bad_inputs:
        return bad_input_table()
    if args.elastic:
        return elastic_trial(args.tries, args.seed, args.keep, args.shards)
    import torch

    from xlearner.engine.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    if not args.spawn:  # import what a run imports once, here: forked children then start warm
        import importlib

        for mod in ("timm", "torchvision", "xlearner.stages", "xlearner.stages.common", "xlearner.stages.baselines",
                    "xlearner.models", "xlearner.engine.trainer", "xlearner.data.readers", "xlearner.data.loader",
                    "xlearner.data.transforms", "xlearner.metrics", "pycocotools.cocoeval",
                    "torch.utils.tensorboard", "torch.utils.flop_counter"):
            importlib.import_module(mod)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="xlearner-faults-"))
    config = write_config(work, args.shards)
    t = time.perf_counter()
    ref = Run(config, work / "ref", resume=False, spawn=args.spawn)
    assert ref.wait() == 0, (work / "ref.console").read_text()
    ref_s = time.perf_counter() - t
    ref_losses, ref_vals, ref_w = results(work / "ref")
    step_s = ref_s / STEPS
    print(f"reference: {STEPS} steps in {ref_s:.1f} s ({'spawned' if args.spawn else 'forked'}), "
          f"checkpoint every step, work folder {work}")
    resumed = matched = stale = loadable = 0
    kinds = ["before", "during", "between"]
    t_all = time.perf_counter()
    for i in range(args.tries):
        kind = kinds[i % 3] if i < 3 else rng.choice(kinds)
        out = work / f"try{i}"
        t = time.perf_counter()
        where = kill_run(config, out, kind, rng, args.spawn, step_s)
        ck = out / "checkpoints" / "last.pt"
        at = "-"
        if ck.exists():
            at = int(load_checkpoint(ck)["step"])  # weights_only=True
            loadable += 1
        code = Run(config, out, resume=True, spawn=args.spawn).wait()
        ok_resume = code == 0
        resumed += ok_resume
        left = temp_files(out)
        stale += len(left)
        same, diff = False, float("nan")
        if ok_resume:
            losses, vals, w = results(out)
            diff = max(float((w[k].double() - ref_w[k].double()).abs().max()) if w[k].numel() else 0.0
                       for k in ref_w)
            same = losses == ref_losses and vals == ref_vals and set(w) == set(ref_w) and diff == 0.0
        matched += same
        print(f"try {i + 1}: killed {where}; checkpoint at step {at}; resume exit {code}; "
              f"losses {'equal' if ok_resume and losses == ref_losses else 'DIFFER'}, max weight diff {diff:g}; "
              f"temp files after resume {len(left)} ({time.perf_counter() - t:.1f} s)", flush=True)
    print(f"tries {args.tries}, resumed {resumed}, matched {matched}, stale files {stale}, "
          f"checkpoints left loadable {loadable} ({time.perf_counter() - t_all:.1f} s)")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if resumed == matched == args.tries and stale == 0 else 1


# ------------------------------------------------------------------------------ elastic restarts

def torchrun(config: Path, out: Path, steps: int, restarts: int = 3) -> subprocess.Popen:
    """`xlearner train CONFIG --stage msmt` on two CPU ranks under torchrun's elastic agent."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), "-m", "xlearner.cli", "train", str(config), "--stage", "msmt",
           "--out", str(out), f"train.steps={steps}"]
    log = open(out.parent / f"{out.name}.console", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def worker_pids(agent: int) -> dict[int, int]:
    """rank -> pid of the agent's worker processes (children whose environment holds RANK)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != agent:
                continue
            env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(d.name)
    return found


def kill_one_rank(config: Path, out: Path, steps: int, rank: int, after: int) -> str:
    """Start the two-rank run; once ``after`` steps are logged and a checkpoint exists, SIGKILL ``rank``."""
    run = torchrun(config, out, steps)
    t0 = time.perf_counter()
    while run.poll() is None and time.perf_counter() - t0 < 300:
        if logged_steps(out) >= after and (out / "checkpoints" / "last.pt").exists():
            pids = worker_pids(run.pid)
            if rank in pids:
                os.kill(pids[rank], signal.SIGKILL)
                break
        time.sleep(0.01)
    else:
        run.wait()
        return f"finished before the kill (exit {run.returncode})"
    at = logged_steps(out)
    code = run.wait()
    console = (out.parent / f"{out.name}.console").read_text()
    resumed = "resumed from" in console
    return f"killed rank {rank} with {at} steps logged; torchrun exit {code}" + \
        ("; resumed from the checkpoint" if resumed else "; NOT resumed")


def elastic_trial(tries: int, seed: int, keep: bool, shards: bool = False) -> int:
    """Kill one rank of a torchrun group per try; its restart must resume and match an uninterrupted run."""
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="xlearner-elastic-"))
    config = write_config(work, args.shards)
    t = time.perf_counter()
    ref = torchrun(config, work / "ref", STEPS, restarts=0)
    assert ref.wait() == 0, (work / "ref.console").read_text()
    print(f"reference: {STEPS} steps on 2 ranks in {time.perf_counter() - t:.1f} s, work folder {work}", flush=True)
    ref_losses, ref_vals, ref_w = results(work / "ref")
    resumed = identical = 0
    for i in range(tries):
        out = work / f"try{i}"
        t = time.perf_counter()
        where = kill_one_rank(config, out, STEPS, rank=i % 2, after=rng.randint(2, STEPS - 4))
        done = (out / "run.json").is_file() and "resumed from" in (work / f"try{i}.console").read_text()
        resumed += done
        same = False
        if done:
            losses, vals, w = results(out)
            same = losses == ref_losses and vals == ref_vals and set(w) == set(ref_w) and all(
                bool((w[k] == ref_w[k]).all()) for k in ref_w)
        identical += same
        print(f"try {i + 1}: {where}; losses and weights {'identical' if same else 'DIFFER'} "
              f"({time.perf_counter() - t:.1f} s)", flush=True)
    print(f"tries {tries}, resumed {resumed}, identical {identical}")
    if not keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0 if resumed == identical == tries else 1


# ------------------------------------------------------------------------------ the bad-input table

def bad_input_table() -> int:
    """Each bad-input case through `data check`, and `train` under on_bad_sample error and skip."""
    import contextlib
    import io
    import re

    import torch
    import yaml

    import fault_cases as fc
    from xlearner.cli import main as cli

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="xlearner-bad-"))

    def run(*argv) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli([str(a) for a in argv])
        return code, out.getvalue() + err.getvalue()

    def short(text: str, n: int = 110) -> str:
        text = re.sub(r"/\S*/([^/\s]+)", r"\1", text.replace("\n", " "))
        return text if len(text) <= n else text[: n - 3] + "..."

    def summary(code: int, text: str) -> str:
        if code == 0:
            m = re.search(r"bad records skipped in training: (.*)", text)
            return f"trained (exit 0); skipped: {m.group(1).strip() if m else '?'}"
        m = re.search(r"xlearner: (.*)", text, re.S)
        return f"exit {code}: {short(m.group(1) if m else text)}"

    rows = []
    for make in fc.DATA_CASES:
        case = make(work / make.__name__ / "data")
        d = work / make.__name__
        code, text = run("data", "check", fc.write_source_yaml(case, d / "src.yaml"))
        problems = re.findall(r"PROBLEM \[train\] (.*)", text)
        check = f"exit {code}, {len(problems)} problem(s)" + (f": {short(problems[0], 90)}" if problems else "")
        cells = [case.name, check]
        for policy in ("error", "skip"):
            cfg = d / f"{policy}.yaml"
            cfg.write_text(yaml.safe_dump(fc.run_config(case.source, policy, steps=4,  # 8 samples: every record
                                                        **{"train.num_workers": 1})))
            cells.append(summary(*run("train", cfg, "--stage", "msmt", "--out", d / f"run_{policy}")))
        rows.append(cells)
    cfgs = fc.config_cases(work / "config")
    for name, path, _ in cfgs:
        code, text = run("train", path, "--stage", "ssst", "--out", work / "config" / "run")
        rows.append([name, "(config: not a source)", summary(code, text), "same (policy does not apply)"])
    for name, make in (("malicious pickle as backbone.weights", fc.malicious_pickle),
                       ("backbone file matching no key", fc.unmatched_weights)):
        d = work / "weights"
        d.mkdir(exist_ok=True)
        w = make(d / ("evil.pth" if "pickle" in name else "other.safetensors"))
        data = fc.run_config(fc._cls(fc._cls_folder(d / "data")))
        data["backbone"]["weights"] = str(w)
        (d / "c.yaml").write_text(yaml.safe_dump(data))
        code, text = run("train", d / "c.yaml", "--stage", "ssst", "--out", d / "run")
        rows.append([name, "(weights: not a source)", summary(code, text), "same (policy does not apply)"])
    head = ["case", "xlearner data check", "train, on_bad_sample: error", "train, on_bad_sample: skip"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
