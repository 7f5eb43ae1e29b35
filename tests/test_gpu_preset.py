"""The `gpu` preset's code path (bf16 autocast, channels_last, worker processes) at CPU size."""
import json

import torch

from xlearner.config import load_config

SHRINK = [
    "backbone.kwargs={channels: [8, 16, 32, 64], stem_width: 8}", "fpn_channels=32", "image_size=32",
    "train.steps=2", "train.warmup_steps=1", "train.amp=bf16", "train.num_workers=1", "train.val_batches=1",
    "train.progress=false", "sources.fashion.image_size=32", "sources.mnist.image_size=32",
    "sources.fashion.max_samples=64", "sources.mnist.max_samples=64",
    *[f"sources.{s}.{k}" for s in ("fashion", "mnist", "glyph_det", "glyph_seg") for k in ("batch_size=4",)],
    *[f"sources.{s}.composer.{k}" for s in ("glyph_det", "glyph_seg")
      for k in ("canvas_size=32", "num_train=16", "num_val=8", "num_test=8")],
]


def test_gpu_preset_path_runs_expansion_and_squeeze_in_bf16_channels_last(tmp_path, embedded_home, monkeypatch,
                                                                          capsys):
    from xlearner.engine import trainer
    from xlearner.stages import train_stage

    embedded_home("fashion_mnist", "mnist")
    cfg = load_config("gpu", SHRINK)
    gpu = load_config("gpu")
    assert gpu.train.channels_last and gpu.train.amp == "auto" and gpu.train.num_workers > 0
    seen = {"dtypes": set(), "channels_last": []}
    real_fit = trainer.fit

    def spy_fit(module, *args, **kwargs):  # look at the module as fit trains it
        convs = [m for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
        hook = convs[-1].register_forward_hook(lambda m, i, o: seen["dtypes"].add(o.dtype))
        try:
            return real_fit(module, *args, **kwargs)
        finally:
            hook.remove()
            seen["channels_last"] += [c.weight.is_contiguous(memory_format=torch.channels_last)
                                      for c in convs if c.kernel_size != (1, 1)]
            if hasattr(module, "teacher"):  # squeeze: the frozen teacher's convs kept in bf16 for autocast
                t_convs = [m for m in module.teacher.modules() if isinstance(m, torch.nn.Conv2d)]
                seen["teacher"] = {c.weight.dtype for c in t_convs}
                seen["channels_last"] += [c.weight.is_contiguous(memory_format=torch.channels_last)
                                          for c in t_convs if c.kernel_size != (1, 1)]

    monkeypatch.setattr(trainer, "fit", spy_fit)
    for stage in ("expansion", "squeeze"):
        info = train_stage(cfg, stage, tmp_path / stage)
        assert info["status"] == "done" and info["cost"]["steps"] == 2
        log = [json.loads(line) for line in (tmp_path / stage / "log.jsonl").read_text().splitlines()]
        train = [r for r in log if "total" in r]
        assert train and all(torch.isfinite(torch.tensor(r["total"])) for r in train)
        assert "amp=torch.bfloat16" in capsys.readouterr().out
    assert torch.bfloat16 in seen["dtypes"]  # convs ran under CPU bf16 autocast
    assert seen["channels_last"] and all(seen["channels_last"])
    assert seen["teacher"] == {torch.bfloat16}
