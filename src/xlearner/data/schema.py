"""The one sample schema every reader yields, and the policy for bad records.

A sample is ``(image, target)``:
- image: ``torch.uint8`` tensor of shape ``(3, H, W)`` (grey images are repeated to 3 channels);
- target: ``{"label": int}`` for cls, ``{"boxes": float32 (N, 4) xyxy in pixels,
  "labels": int64 (N,)}`` for det, ``{"mask": int64 (H, W), 255 = ignore}`` for seg.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from xlearner.targets import IGNORE_INDEX  # noqa: F401 (the readers import it here)


class BadSampleError(ValueError):
    """A record that cannot be used; the message names the file, the record and the fix."""


@dataclass
class BadSampleLog:
    """Collects records skipped under ``on_bad_sample: skip`` so training can print the count.

    Records that fail to decode are met wherever a sample is read, often in a DataLoader worker
    process whose copy of this log the main process never sees. So after :meth:`track` each record
    has a flag in shared memory, set by whichever process failed to decode it: ``count`` in the main
    process includes the workers' skips (each record once), and a worker that meets a record
    another one flagged skips it without decoding it again.
    """

    source: str
    policy: str = "error"
    skipped: list[str] = field(default_factory=list)
    """Messages of the records skipped in this process (opening the source, and decoding here)."""
    failed: torch.Tensor | None = None
    """uint8 flag per record, in shared memory: 1 once any process failed to decode the record."""
    _local: set = field(default_factory=set)

    def track(self, n: int) -> None:
        """Give the ``n`` records of the source shared-memory decode-failure flags."""
        self.failed = torch.zeros(n, dtype=torch.uint8).share_memory_()
        self._local = set()

    def report(self, message: str) -> None:
        """Raise under the 'error' policy; record and go on under 'skip'."""
        if self.policy == "error":
            raise BadSampleError(
                f"{message}\n  (source '{self.source}'; fix the record, or set on_bad_sample: skip "
                f"in this source's config to skip such records and count them)"
            )
        self.skipped.append(message)

    def report_record(self, index: int, message: str) -> None:
        """A tracked record failed to decode: raise under 'error'; under 'skip' flag it (once) and go on."""
        if index in self._local and self.policy != "error":
            return
        self.report(message)  # raises under 'error'
        if self.failed is not None:
            self._local.add(index)
            self.failed[index] = 1

    def is_failed(self, index: int) -> bool:
        return self.failed is not None and bool(self.failed[index])

    def failed_indices(self) -> list[int]:
        """Records flagged by any process (DataLoader workers included)."""
        return [] if self.failed is None else self.failed.nonzero().flatten().tolist()

    @property
    def count(self) -> int:
        """Records skipped so far, by this process and by any worker that shares the flags."""
        elsewhere = 0 if self.failed is None else int(self.failed.sum()) - len(self._local)
        return len(self.skipped) + elsewhere


def check_image(image: torch.Tensor, where: str) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise BadSampleError(f"{where}: image must be uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")


def validate_target(task: str, image: torch.Tensor, target: dict, num_classes: int, where: str) -> str | None:
    """Return a description of what is wrong with a target, or None when it is sound (the task's check)."""
    from xlearner import tasks

    return tasks.get(task).check_target(image, target, num_classes, where)
