"""`xlearner data show`: a grid of samples with their labels drawn, to see what a model is fed."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

CELL = 224
"""Each sample is drawn at least this many pixels wide so that class names stay readable."""

_PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
            (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
            (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128)]


def _colour(k: int) -> tuple[int, int, int]:
    return _PALETTE[k % len(_PALETTE)]


def _upscale(image: torch.Tensor) -> tuple[torch.Tensor, float]:
    h, w = image.shape[-2:]
    f = max(1, int(np.ceil(CELL / max(h, w))))
    if f == 1:
        return image, 1.0
    return image.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1), float(f)


def render(dataset, i: int) -> tuple[np.ndarray, str, set[int]]:
    """One sample drawn by its task (``Task.draw``) as an HxWx3 uint8 array, its caption and the
    classes to list in the legend."""
    from xlearner import tasks

    image, target = dataset[i]
    big, f = _upscale(image)
    style = tasks.DrawStyle(_colour, _font(), max(10, big.shape[-1] // 16))
    pic, caption, legend = tasks.get(dataset.task).draw(big, target, dataset.class_names, f, style)
    return pic.permute(1, 2, 0).numpy(), caption, legend


def _font() -> str | None:
    """A TrueType font if matplotlib ships one (torchvision's default bitmap font is tiny)."""
    try:
        import matplotlib
        p = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return str(p) if p.is_file() else None
    except ImportError:
        return None


def show_grid(dataset, out_png: str | Path, n: int = 16, seed: int = 0) -> Path:
    """Save a grid of ``n`` random samples (boxes, masks and class names drawn) to ``out_png``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = min(n, len(dataset))
    if n == 0:
        raise ValueError(f"dataset {getattr(dataset, 'name', '?')} is empty: nothing to show")
    idx = np.sort(np.random.default_rng(seed).choice(len(dataset), size=n, replace=False))
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    drawn = [render(dataset, int(i)) for i in idx]
    seen: set[int] = set().union(*(legend for _, _, legend in drawn))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows + (0.8 if seen else 0)), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i, (pic, caption, _) in zip(axes.ravel(), idx, drawn):
        ax.imshow(pic, interpolation="nearest")
        ax.set_title(f"#{i}: {caption}", fontsize=8)
    if seen:
        handles = [Patch(color=np.array(_colour(k)) / 255, label=dataset.class_names[k]) for k in sorted(seen)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.suptitle(f"{getattr(dataset, 'name', 'dataset')} ({dataset.task}, {len(dataset)} samples)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if seen else 0, 1, 0.97))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
