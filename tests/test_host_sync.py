"""A training step's forward, backward and gradient clipping run no operator that makes the host
wait for the device (boolean-mask indexing, ``.item()``): on CUDA each one stalls the step until
the GPU has caught up. Checked on CPU through the operators the profiler records."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from xlearner.config import load_config
from xlearner.models.heads import pad_targets
from xlearner.models.nets import SourceSpec

SYNCING = {"aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::masked_select"}
NUM_CLASSES = {"cls": 10, "det": 20, "seg": 21}


def _batch(cfg, g: torch.Generator) -> dict:
    batch = {}
    for s in cfg.sources:
        size = cfg.size_of(s)
        images = torch.randn(2, 3, size, size, generator=g)
        if s.task == "cls":
            batch[s.name] = {"images": images, "labels": torch.randint(0, NUM_CLASSES["cls"], (2,), generator=g)}
        elif s.task == "det":  # the training loader's padded layout; the second image has no box
            boxes, labels = pad_targets([{"boxes": torch.tensor([[2.0, 2.0, 20.0, 24.0], [8.0, 6.0, 30.0, 30.0]]),
                                          "labels": torch.tensor([1, 3])},
                                         {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}],
                                        torch.device("cpu"))
            batch[s.name] = {"images": images, "boxes": boxes, "labels": labels}
        else:
            masks = torch.randint(0, NUM_CLASSES["seg"], (2, size, size), generator=g)
            masks[:, :2] = 255  # ignored pixels
            batch[s.name] = {"images": images, "masks": masks}
    return batch


def _module(cfg, stage: str, specs):
    if stage == "expansion":
        from xlearner.stages.expansion import ExpansionStage

        return ExpansionStage.build(cfg, specs)
    if stage == "squeeze":
        from xlearner.stages.expansion import build_expanded_net
        from xlearner.stages.squeeze import SqueezeStage

        teacher = build_expanded_net(cfg, specs).eval().requires_grad_(False)
        return SqueezeStage(cfg, specs, teacher)
    from xlearner.stages.baselines import MSMT

    return MSMT.build(cfg, specs)  # every task's loss on one shared backbone


@pytest.mark.parametrize("stage", ["msmt", "expansion", "squeeze"])
def test_training_step_has_no_host_synchronisation(stage):
    torch.manual_seed(0)
    cfg = load_config("quick", check_files=False)
    specs = [SourceSpec(s.name, s.task, NUM_CLASSES[s.task]) for s in cfg.sources]
    assert {s.task for s in specs} == {"cls", "det", "seg"}
    module = _module(cfg, stage, specs).train()
    batch = _batch(cfg, torch.Generator().manual_seed(0))
    params = [p for p in module.parameters() if p.requires_grad]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        losses = module(batch)
        sum(v.float() for v in losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
    assert set(losses) >= {s.name for s in specs} and all(torch.isfinite(v) for v in losses.values())
    ops = {e.key: e.count for e in prof.key_averages()}
    assert "aten::convolution_backward" in ops  # the profiler saw the step
    syncing = {k: ops[k] for k in SYNCING if k in ops}
    assert not syncing, f"{stage}: operators that wait for the device, with their counts: {syncing}"
