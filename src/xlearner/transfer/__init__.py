"""Transfer: measure a backbone on downstream datasets it never saw.

- ``suite.transfer_one(backbone_path, source, cfg, mode=None, seeds=None) -> dict`` and the
  ``xlearner transfer`` command (``suite.transfer_command``); the task object (``xlearner.tasks``)
  gives the modes, the default mode and the metric;
- ``linear_probe.probe``: cls ``linear`` mode, logistic regression on frozen pooled features;
- ``train.transfer_trained``: ``frozen`` and ``finetune`` modes of every task: the task's neck +
  head (cls: pooled linear; det: FPN + FCOS; seg: FPN + Panoptic-FPN head or a linear probe)
  trained by the engine's ``fit``, scored by the task's evaluator (top-1, COCO mAP, mIoU);
- ``features``: frozen feature extraction (pooled features, cached feature maps), AdaBN, subsets.
Submodules are imported on use (torch/timm/sklearn are heavy).
"""
