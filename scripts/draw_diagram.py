"""Draw X-Learner's flow (sources -> expansion -> squeeze -> transfer -> report) into docs/img/xlearner.png.

The README shows this picture; drawing it from a script keeps it in step with the method's
words (docs/architecture.md) instead of a binary nobody can edit.
Run: .venv/bin/python scripts/draw_diagram.py [--out docs/img/xlearner.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

TASK_COLOURS = {"cls": "#4C72B0", "det": "#DD8452", "seg": "#55A868"}
STUDENT = "#8172B3"
GREY = "#F2F2F2"


def box(ax, x, y, w, h, text, face="white", edge="#333333", size=8.5, weight="normal", colour="black"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=face, edgecolor=edge, linewidth=1.1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size,
            fontweight=weight, color=colour)


def arrow(ax, start, end, colour="#333333", style="-|>", width=1.3, dashed=False):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=11, color=colour,
                                 linewidth=width, linestyle="--" if dashed else "-", zorder=3))


def panel(ax, x, w, title, subtitle):
    box(ax, x, 0.25, w, 4.5, "", face=GREY, edge="#BBBBBB")
    ax.text(x + w / 2, 4.5, title, ha="center", va="center", fontsize=10.5, fontweight="bold")
    ax.text(x + w / 2, 4.2, subtitle, ha="center", va="center", fontsize=7.5, style="italic")


def draw(out: Path) -> None:
    fig, ax = plt.subplots(figsize=(12, 4.2), dpi=110)
    ax.set_xlim(0, 16.6)
    ax.set_ylim(0, 5)
    ax.axis("off")
    rows = {"cls": 3.3, "det": 2.2, "seg": 1.1}

    # Sources: labelled datasets of three task types.
    panel(ax, 0.1, 2.3, "sources", "labelled, many tasks")
    examples = {"cls": "ImageNet, MNIST...\n(ImageFolder, CSV)", "det": "COCO, VOC...\n(boxes)",
                "seg": "ADE20K...\n(mask folders)"}
    for task, y in rows.items():
        box(ax, 0.3, y - 0.35, 1.9, 0.7, f"{task}\n{examples[task]}", face="white",
            edge=TASK_COLOURS[task], size=7)

    # Expansion: one backbone per task, joined by reconciliation layers.
    panel(ax, 2.8, 3.6, "1. expansion", "one backbone per task + reconciliation")
    for task, y in rows.items():
        arrow(ax, (2.2, y), (3.0, y), colour=TASK_COLOURS[task])
        box(ax, 3.0, y - 0.3, 2.1, 0.6, f"{task} backbone", face=TASK_COLOURS[task], edge=TASK_COLOURS[task],
            size=8.5, colour="white", weight="bold")
        box(ax, 5.45, y - 0.22, 0.8, 0.44, f"{task} head", size=7)
        arrow(ax, (5.1, y), (5.45, y))
    for top, bottom in (("cls", "det"), ("det", "seg")):
        arrow(ax, (4.05, rows[top] - 0.3), (4.05, rows[bottom] + 0.3), style="<|-|>", colour="#555555", width=1.0)
    ax.text(4.2, 0.6, "reconciliation: 1x1 convs pass each branch\nthe others' features after stages 1-3",
            ha="center", va="center", fontsize=7)

    # Squeeze: one student backbone learns every source again, distilling the expanded model.
    panel(ax, 6.8, 3.6, "2. squeeze", "one student + adapters, distillation")
    arrow(ax, (6.3, 2.2), (7.0, 2.2), width=1.6)
    ax.text(6.65, 2.45, "teacher", ha="center", fontsize=7)
    box(ax, 7.0, 1.6, 1.8, 1.2, "student\nbackbone\n(size of one)", face=STUDENT, edge=STUDENT,
        size=8.5, colour="white", weight="bold")
    for task, y in rows.items():
        box(ax, 9.2, y - 0.28, 1.0, 0.56, f"adapter\n{task}", edge=TASK_COLOURS[task], size=7)
        arrow(ax, (8.8, 2.2), (9.2, y), colour=TASK_COLOURS[task], width=1.0)
    # Only the student goes on: routed above the adapters.
    ax.plot([7.9, 7.9, 11.15], [2.8, 3.8, 3.8], color="#333333", linewidth=1.6, zorder=3)
    arrow(ax, (11.15, 3.8), (11.15, 2.25), width=1.6)
    ax.text(10.6, 3.88, "student only", ha="center", va="bottom", fontsize=7)
    ax.text(8.6, 0.6, "adapters distil the expanded features\n(then thrown away) + every task's loss",
            ha="center", va="center", fontsize=7)

    # Transfer: the student alone on datasets it never saw.
    panel(ax, 10.8, 3.6, "3. transfer", "unseen downstream datasets")
    heads = {"cls": "linear probe\n(top-1)", "det": "FPN + FCOS head\n(COCO mAP)", "seg": "FPN head\n(mIoU)"}
    for task, y in rows.items():
        box(ax, 11.7, y - 0.32, 2.4, 0.64, heads[task], edge=TASK_COLOURS[task], size=7.5)
        arrow(ax, (11.15, 2.2), (11.7, y), colour=TASK_COLOURS[task], width=1.0)
    ax.text(12.6, 0.6, "same seeds for X-Learner and every\nbaseline: SSST, MSST, MSMT, scratch",
            ha="center", va="center", fontsize=7)

    # Report.
    arrow(ax, (14.4, 2.2), (14.8, 2.2), width=1.6)
    box(ax, 14.8, 1.35, 1.7, 1.7, "report.md\n\ngains per task\ntype ± s.e.\nwin / tie / loss\ngates", face="white",
        size=7.5)

    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs/img/xlearner.png")
    draw(parser.parse_args().out)


if __name__ == "__main__":
    main()
