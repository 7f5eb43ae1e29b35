"""Transfer: measure a backbone on downstream datasets it never saw.

- ``suite.transfer_one(backbone_path, source, cfg, mode=None, seeds=None) -> dict`` and the
  ``xlearner transfer`` command (``suite.transfer_command``);
- ``linear_probe``: ``probe`` (logistic regression on frozen pooled features) and ``finetune``;
- ``detection.transfer_det``: FPN + FCOS head, frozen or fine-tuned, COCO mAP / AP50;
- ``segmentation.transfer_seg``: FPN + Panoptic-FPN semantic head, frozen or fine-tuned, mIoU;
- ``features``: frozen feature extraction and the shared head-training loop.
Submodules are imported on use (torch/timm/sklearn are heavy).
"""
