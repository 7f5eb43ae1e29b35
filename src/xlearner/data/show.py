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


def render(dataset, i: int) -> tuple[np.ndarray, str]:
    """One sample drawn as an HxWx3 uint8 array, and its caption."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    image, target = dataset[i]
    names = dataset.class_names
    big, f = _upscale(image)
    if dataset.task == "cls":
        return big.permute(1, 2, 0).numpy(), names[target["label"]]
    if dataset.task == "det":
        boxes, labels = target["boxes"], target["labels"].tolist()
        if len(boxes):
            big = draw_bounding_boxes(big, boxes * f, labels=[names[k] for k in labels],
                                      colors=[_colour(k) for k in labels], width=2,
                                      font_size=max(10, big.shape[-1] // 16) if _font() else None,
                                      font=_font())
        return big.permute(1, 2, 0).numpy(), f"{len(labels)} objects"
    mask = target["mask"]
    if f > 1:
        mask = mask.repeat_interleave(int(f), 0).repeat_interleave(int(f), 1)
    present = [int(k) for k in torch.unique(mask).tolist() if k != 0 and k != 255]
    if present:
        big = draw_segmentation_masks(big, torch.stack([mask == k for k in present]), alpha=0.5,
                                      colors=[_colour(k) for k in present])
    return big.permute(1, 2, 0).numpy(), ", ".join(names[k] for k in present) or "background only"


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
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows + (0.8 if dataset.task == "seg" else 0)),
                             squeeze=False)
    seen: set[int] = set()
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), idx):
        pic, caption = render(dataset, int(i))
        ax.imshow(pic, interpolation="nearest")
        ax.set_title(f"#{i}: {caption}", fontsize=8)
        if dataset.task == "seg":
            seen.update(int(k) for k in torch.unique(dataset[int(i)][1]["mask"]).tolist() if k not in (0, 255))
    if dataset.task == "seg" and seen:
        handles = [Patch(color=np.array(_colour(k)) / 255, label=dataset.class_names[k]) for k in sorted(seen)]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    fig.suptitle(f"{getattr(dataset, 'name', 'dataset')} ({dataset.task}, {len(dataset)} samples)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if dataset.task == "seg" else 0, 1, 0.97))
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
