"""`xlearner bench CONFIG`: how fast a config trains on this machine, what binds each stage, and
how long its `xlearner run` will take.

detectron2's ``tools/benchmark.py`` measures train, eval and data throughput of one model; this
measures every part of the main job the config defines, with the user's own data and loaders:

- each source's training loader alone (the configured ``train.num_workers``): images/s;
- each training stage, trained for ``--steps`` steps in a scratch folder exactly as
  ``xlearner run`` trains it (same module, loader, validation, precise BN): the time inside steps,
  the time waiting for data, validation, set-up, and the peak memory;
- one transfer per downstream dataset (every seed of the config, a random backbone of the run's
  architecture: a transfer's cost does not depend on the weights);

then the estimated wall time of ``xlearner run``: per stage set-up + its steps x the measured time
per step + its validations, per method its transfers. The assumptions are printed with it.
"""
from __future__ import annotations

import contextlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from xlearner.config import RunConfig, load_config
from xlearner.files import read_json

PROBE_STEPS_KEYS = ("train.steps", "baselines.steps", "expansion.steps", "squeeze.steps")


def peak_memory_mb() -> float:
    """Peak memory so far: the CUDA allocator's peak on a GPU, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def loader_rate(cfg: RunConfig, source, batches: int) -> dict:
    """Images/s of one source's training loader (its transform, the configured workers), after the first batch."""
    from xlearner.stages import common

    data = common.build_stage_data(cfg, [source], with_val=False)
    try:
        t0 = time.perf_counter()
        next(data.loader)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(batches):
            next(data.loader)
        dt = time.perf_counter() - t0
    finally:
        data.loader.close()
    return {"source": source.name, "task": source.task, "workers": cfg.train.num_workers,
            "images_per_s": batches * source.batch_size / max(dt, 1e-9), "first_batch_s": first}


def probe_overrides(steps: int) -> list[str]:
    """Every stage trains ``steps`` steps, validates once at the end, checkpoints only there."""
    return [f"{k}={steps}" for k in PROBE_STEPS_KEYS] + ["train.val_every=0", f"train.ckpt_every={steps}",
                                                         "train.progress=false"]


def stage_probe(part, steps: int) -> dict:
    """Train one stage part for ``steps`` steps in its (scratch) folder; its per-step and fixed costs."""
    from xlearner.pipeline import load_config_like, run_part
    from xlearner.stages import STAGES

    stage = STAGES[part.stage]
    full_steps = stage.steps(part.cfg)
    part.cfg = load_config_like(part.cfg, probe_overrides(steps)) if full_steps else part.cfg
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run_part(part, part.cfg)
    wall = time.perf_counter() - t0
    info = read_json(part.path / "run.json") or {}
    fit, step, evals = float(info.get("fit_s") or 0.0), float(info.get("step_s") or 0.0), float(info.get("fit_eval_s") or 0.0)
    data_wait = max(0.0, fit - step - evals)
    done = int((info.get("cost") or {}).get("steps") or 0)
    images = int((info.get("cost") or {}).get("images_seen") or 0)
    return {"stage": part.name, "steps": full_steps, "probe_steps": done, "setup_s": max(0.0, wall - fit + evals),
            "step_s": step / done if done else 0.0, "data_wait_s": data_wait / done if done else 0.0,
            "eval_s": evals, "images_per_step": images / done if done else 0,
            "binds": ("data" if data_wait > step else "compute") if done else "-",
            "peak_memory_mb": peak_memory_mb(), "backbone_params": (info.get("cost") or {}).get("backbone_params"),
            "gflops_per_image": (info.get("cost") or {}).get("gflops_per_image") or {}}


def stage_eta(probe: dict, val_every: int) -> float:
    """Set-up (model, loaders, validation once) + steps x (step + data wait) + the other validations."""
    n = probe["steps"]
    extra_evals = (n // val_every - (1 if n % val_every == 0 else 0)) if val_every and n else 0
    return probe["setup_s"] + n * (probe["step_s"] + probe["data_wait_s"]) + extra_evals * probe["eval_s"]


def measure(cfg: RunConfig, steps: int = 10, loader_batches: int = 10, transfers: bool = True,
            out: Path | None = None) -> dict:
    """Every figure of the bench, as a JSON-able dict (``out``: the scratch folder, else a temporary one).
    What the measured parts print goes to stderr: stdout keeps the tables (or the JSON)."""
    from xlearner.data.embedded import fetch

    fetch(sorted({s.dataset for s in cfg.sources if s.format == "embedded" and s.dataset} | set(cfg.transfer.datasets)))
    res: dict = {"config": cfg.name, "device": "cuda" if torch.cuda.is_available() else "cpu",
                 "threads": torch.get_num_threads(), "probe_steps": steps, "loaders": [], "stages": [], "transfers": []}
    with tempfile.TemporaryDirectory(prefix="xlearner-bench-") as tmp, contextlib.redirect_stdout(sys.stderr):
        methods = _measure_parts(cfg, Path(out) if out is not None else Path(tmp), res, steps, loader_batches, transfers)
    res["eta"] = eta(res, cfg, methods)
    return res


def _measure_parts(cfg: RunConfig, folder: Path, res: dict, steps: int, loader_batches: int, transfers: bool) -> dict:
    """The loaders, every training part, then one method's transfers twice (the first pass pays what a
    run pays once: imports, caches) and the report; fills ``res``, returns the run's methods."""
    from xlearner.pipeline import build_parts, run_part
    from xlearner.report import write_report

    parts, methods = build_parts(cfg, folder)
    train = [p for p in parts if p.kind == "train"]
    first_method = next(m for m in methods if methods[m])  # transfers measured on its (probe) backbone
    export = next(p for p in parts if p.kind == "export" and p.name == f"export {first_method}")
    transfer = [p for p in parts if p.kind == "transfer" and export.name in p.deps] if transfers else []
    with tqdm(total=len(cfg.sources) + len(train) + 2 + 2 * len(transfer), desc="bench", unit="part") as bar:
        def step(name: str) -> None:
            bar.set_description(f"bench [{name}]")
            bar.update()

        for s in cfg.sources:
            res["loaders"].append(loader_rate(cfg, s, loader_batches))
            step(f"loader {s.name}")
        for p in train:
            res["stages"].append(stage_probe(p, steps))
            step(p.name)
        run_part(export, cfg)
        step("export")
        for rnd in ("first", "again"):
            for p in transfer:
                t0 = time.perf_counter()
                run_part(p, cfg)
                if rnd == "first":
                    res["transfers"].append({"dataset": p.dataset, "seeds": cfg.transfer.seeds})
                next(t for t in res["transfers"] if t["dataset"] == p.dataset)[f"{rnd}_s"] = time.perf_counter() - t0
                step(f"{p.name} ({rnd})")
        t0 = time.perf_counter()
        write_report(folder)
        res["report_s"] = time.perf_counter() - t0
        step("report")
    return methods


def eta(res: dict, cfg: RunConfig, methods: dict) -> dict:
    """The estimated wall time of ``xlearner run`` on this config, with its parts and assumptions."""
    train_s = {st["stage"]: stage_eta(st, cfg.train.val_every) for st in res["stages"]}
    first = sum(t["first_s"] for t in res["transfers"])
    again = sum(t["again_s"] for t in res["transfers"])
    transfer_s = first + again * (len(methods) - 1) if res["transfers"] else 0.0
    assumptions = [
        f"each stage's time per step is that of its first {res['probe_steps']} steps (the first steps are often "
        "slower: the estimate errs long)",
        "validation costs what it cost once at the end of the probe; checkpoints cost nothing",
        f"the first method's transfers cost what a random backbone's first did ({first:.1f} s), each of the other "
        f"{len(methods) - 1} methods' what they did again ({again:.1f} s)"
        if res["transfers"] else "transfers not measured (--no-transfer): not in the estimate",
        "data already fetched; a first run also creates the environment and downloads the data",
    ]
    return {"train_s": train_s, "transfer_s": transfer_s, "transfers_per_method_s": again,
            "report_s": res.get("report_s", 0.0), "total_s": sum(train_s.values()) + transfer_s + res.get("report_s", 0.0),
            "methods": len(methods), "assumptions": assumptions}


def render(res: dict) -> str:
    """The bench as tables (what `xlearner bench` prints)."""
    L = [f"xlearner bench: config {res['config']}, device {res['device']}, {res['threads']} threads", "",
         "loaders (each source alone, configured workers):",
         f"  {'source':<16} {'task':<4} {'workers':>7} {'images/s':>9} {'first batch s':>13}"]
    L += [f"  {r['source']:<16} {r['task']:<4} {r['workers']:>7} {r['images_per_s']:>9.0f} {r['first_batch_s']:>13.2f}"
          for r in res["loaders"]]
    L += ["", f"stages ({res['probe_steps']} steps each; s per step: inside the step / waiting for data):",
          f"  {'stage':<12} {'steps':>6} {'step s':>8} {'data s':>8} {'images/s':>9} {'binds':>8} "
          f"{'setup s':>8} {'val s':>6} {'peak MB':>8} {'ETA s':>8}"]
    for st in res["stages"]:
        per = st["step_s"] + st["data_wait_s"]
        rate = st["images_per_step"] / per if per else 0.0
        L.append(f"  {st['stage']:<12} {st['steps']:>6} {st['step_s']:>8.3f} {st['data_wait_s']:>8.3f} {rate:>9.1f} "
                 f"{st['binds']:>8} {st['setup_s']:>8.1f} {st['eval_s']:>6.1f} {st['peak_memory_mb']:>8.0f} "
                 f"{res['eta']['train_s'][st['stage']]:>8.1f}")
    if res["transfers"]:
        L += ["", "transfers (one backbone, every seed):"]
        L += [f"  {t['dataset']:<24} {t['seeds']} seeds  first {t['first_s']:>6.1f} s  again {t['again_s']:>6.1f} s"
              for t in res["transfers"]]
    e = res["eta"]
    L += ["", f"estimated `xlearner run`: {e['total_s'] / 60:.1f} min ({e['total_s']:.0f} s: training "
          f"{sum(e['train_s'].values()):.0f} s, transfers of {e['methods']} methods {e['transfer_s']:.0f} s, "
          f"report {e['report_s']:.0f} s)", "assumptions:"]
    L += [f"  - {a}" for a in e["assumptions"]]
    return "\n".join(L)


def bench_command(args) -> int:
    cfg = load_config(args.config, list(args.overrides or []))
    res = measure(cfg, steps=args.steps, loader_batches=args.loader_batches, transfers=not args.no_transfer)
    print("", file=sys.stderr)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(render(res))
    return 0
