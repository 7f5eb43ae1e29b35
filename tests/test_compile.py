"""Every stage's training step compiles whole: ``fullgraph=True`` (which raises at a graph break)
(issue 28, item 2), and the compiled losses and gradients equal eager ones.
``bench_stages.py --graph-breaks`` prints the graphs and breaks per stage.

The backend is ``aot_eager``: dynamo's capture and AOTAutograd's backward graph, which is where a
break or an untraceable operator would show, without inductor's code generation (minutes on CPU).
"""
import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # dynamo traces through the lru_cache of the CPU resize weights and says it may be unsound
              pytest.mark.filterwarnings("ignore:.*lru_cache")]

_spec = importlib.util.spec_from_file_location("bench_stages", Path(__file__).parents[1] / "benchmarks" / "bench_stages.py")
bench_stages = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_stages)

STAGES = ("msst_cls", "msst_det", "msst_seg", "msmt", "expansion", "squeeze")


@pytest.fixture(scope="module")
def runners():
    from xlearner.config import load_config

    cfg = load_config("quick", [f"sources.{n}.batch_size=2" for n in ("fashion", "mnist", "glyph_det", "glyph_seg")],
                      check_files=False)
    return {st: pair[0] for st, pair in bench_stages.build_pairs(cfg, list(STAGES), torch.device("cpu")).items()}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_step_compiles_whole_and_equals_eager(runners, stage):
    runner = runners[stage]
    module = runner.module
    params = [p for p in module.parameters() if p.requires_grad]

    def step(fn):
        for p in params:
            p.grad = None
        torch.manual_seed(0)  # the seg loss samples its pixels
        loss = sum(fn(runner.batch).values())
        loss.backward()
        return loss.detach(), [p.grad.clone() if p.grad is not None else None for p in params]

    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")  # a graph break raises here
    eager_loss, eager_grads = step(module)
    loss, grads = step(compiled)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert sum(g is not None for g in grads) == sum(g is not None for g in eager_grads) > 0
    for g, e in zip(grads, eager_grads):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_a_compiled_det_step_compiles_once_whatever_the_box_count(runners, monkeypatch):
    """The det loss reads the loader's matched targets, (B, A) whatever the boxes: batches with
    more boxes per image reuse the compiled step (no train.det_pad_boxes needed); the boxes
    themselves are read only when the level grids differ from the encoder's."""
    import torch.nn.functional as F

    runner = runners["msst_det"]
    (name, b), = runner.batch.items()
    assert "fcos_labels" in b, "the bench batch must carry the loader's targets to be a test"
    more = {**b, "boxes": F.pad(b["boxes"], (0, 0, 0, 3)), "labels": F.pad(b["labels"], (0, 3), value=-1)}
    torch._dynamo.reset()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    compiled = torch.compile(runner.module, fullgraph=True, backend="aot_eager")
    first = compiled({name: b})
    second = compiled({name: more})  # error_on_recompile: a second graph would raise here
    torch.testing.assert_close(second, first)
