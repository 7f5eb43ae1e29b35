"""Method levers of the anchors (docs/levers.md): multi-stage reconciliation, multi-teacher
distillation, distillation loss variants, per-source teacher statistics, a generalist teacher,
and their ablation names in the main job. Tiny nets, random tensors, one thread."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from xlearner.config import RunConfig, apply_overrides

torch.set_num_threads(1)
SIZE = 32


def tiny_cfg(**extra) -> RunConfig:
    data = {
        "name": "tiny", "image_size": SIZE, "fpn_channels": 32,
        "backbone": {"name": "resnet18", "kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}},
        "sources": [
            {"name": "digits", "task": "cls", "dataset": "mnist", "batch_size": 4},
            {"name": "scenes", "task": "det", "dataset": "composed_det_glyphs", "batch_size": 2},
            {"name": "regions", "task": "seg", "dataset": "composed_seg_glyphs", "batch_size": 2},
        ],
        "train": {"steps": 2},
    }
    apply_overrides(data, [f"{key}={json.dumps(value)}" for key, value in extra.items()])  # JSON is YAML
    return RunConfig.model_validate(data)


def specs():
    from xlearner.models.nets import SourceSpec

    return [SourceSpec("digits", "cls", 10), SourceSpec("scenes", "det", 20), SourceSpec("regions", "seg", 21)]


def expanded(cfg: RunConfig):
    from xlearner.stages.expansion import build_expanded_net

    torch.manual_seed(0)
    return build_expanded_net(cfg, specs())


def cls_seg_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"digits": {"images": torch.randn(4, 3, SIZE, SIZE, generator=g), "labels": torch.tensor([0, 1, 2, 3])},
            "regions": {"images": torch.randn(2, 3, SIZE, SIZE, generator=g),
                        "masks": torch.randint(0, 21, (2, SIZE, SIZE), generator=g)}}


# ----------------------------------------------------------------------------- reconciliation
def test_multi_stage_reconciliation_is_the_identity_at_init():
    from xlearner.models.nets import MultiStageExpandedNet
    from xlearner.models.reconciliation import MultiStageReconciliation

    net = expanded(tiny_cfg(**{"expansion.reconcile_from": "all", "expansion.reconcile_after": [1, 2, 3]}))
    assert isinstance(net, MultiStageExpandedNet)
    r3 = net.reconcilers["s3"]["cls_from_det"]
    assert isinstance(r3, MultiStageReconciliation) and len(r3.paths) == 3  # stages 1, 2, 3 of det feed stage 3
    # stage 1 (stride 4) reaches stage 3 (stride 16) through two stride-2 3x3 convs; stage 3 through a 1x1 conv
    assert [m.stride for m in r3.paths[0] if isinstance(m, torch.nn.Conv2d)] == [(2, 2), (2, 2)]
    assert [m.kernel_size for m in r3.paths[2] if isinstance(m, torch.nn.Conv2d)] == [(1, 1)]
    x = torch.randn(3, 3, SIZE, SIZE)
    for mode in ("train", "eval"):
        net.train(mode == "train")
        with torch.no_grad():
            for t in net.tasks:
                alone = net.backbones[t](x)  # the branch without any reconciliation
                for a, b in zip(net.branch_features(x, t), alone):
                    assert torch.equal(a, b), (mode, t)
    # not trivially so: with a non-zero last BN the other branches change branch cls
    with torch.no_grad():
        for path in r3.paths:
            [m for m in path if isinstance(m, torch.nn.BatchNorm2d)][-1].weight.fill_(1.0)
        net.eval()
        assert not torch.equal(net.branch_features(x, "cls")[2], net.backbones["cls"](x)[2])


def test_multi_stage_reconciliation_learns_through_every_path():
    """After two steps every conv and BN of every path has moved (the first step only moves the
    zero-initialised last BNs; inner BNs start at gamma = 1 so deeper paths are not dead)."""
    net = expanded(tiny_cfg(**{"expansion.reconcile_from": "all", "expansion.reconcile_after": [3]}))
    rec = net.reconcilers["s3"]
    before = {k: v.clone() for k, v in rec.state_dict().items() if "running" not in k and "num_batches" not in k}
    opt = torch.optim.SGD(rec.parameters(), lr=0.5)
    x = torch.randn(4, 3, SIZE, SIZE)
    for _ in range(2):
        opt.zero_grad()
        net.branch_features(x, "cls")[2].pow(2).mean().backward()
        opt.step()
    after = rec.state_dict()
    used = [k for k in before if k.startswith("cls_from_")]  # the layers feeding branch cls
    assert len(used) > 10
    unchanged = [k for k in used if torch.equal(before[k], after[k])]
    assert not unchanged, unchanged
    # the other branches are detached (expansion.detach_others): no gradient flows into them
    assert all(p.grad is None for p in net.backbones["det"].parameters())


def test_reconcile_from_same_keeps_todays_layers():
    from xlearner.models.nets import MultiStageExpandedNet
    from xlearner.models.reconciliation import Reconciliation

    net = expanded(tiny_cfg())
    assert not isinstance(net, MultiStageExpandedNet)
    assert isinstance(net.reconcilers["s2"]["cls_from_det"], Reconciliation)


# ----------------------------------------------------------------------------- distillation losses
def _maps(*pixels):
    """(1, C, 2, 2) map from four C-vectors in (0,0), (0,1), (1,0), (1,1) order."""
    return torch.tensor(pixels, dtype=torch.float32).T.reshape(1, -1, 2, 2)


def test_distillation_losses_hand_checked_values():
    from xlearner.stages.squeeze import cka_distill_loss, cosine_distill_loss, feature_distill_loss

    t = _maps([1.0, 0.0], [0.0, 2.0], [3.0, 1.0], [-1.0, 1.0])
    ortho = _maps([0.0, 1.0], [-2.0, 0.0], [-1.0, 3.0], [-1.0, -1.0])  # each pixel rotated by 90 degrees
    rot = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    rotated = torch.einsum("dc,bchw->bdhw", rot, t)
    for fn in (feature_distill_loss, cosine_distill_loss, cka_distill_loss):
        assert float(fn(t, t)) == pytest.approx(0.0, abs=1e-6), fn.__name__
        assert float(fn(3.0 * t, t)) == pytest.approx(0.0, abs=1e-6), fn.__name__
    # normalised L2 per pixel = 2 - 2 cos: 4 for opposite vectors, 2 for orthogonal ones
    assert float(feature_distill_loss(-t, t)) == pytest.approx(4.0)
    assert float(feature_distill_loss(ortho, t)) == pytest.approx(2.0)
    # cosine of the whole map: opposite -> 2; per-pixel orthogonal -> whole maps orthogonal too -> 1
    assert float(cosine_distill_loss(-t, t)) == pytest.approx(2.0)
    assert float(cosine_distill_loss(ortho, t)) == pytest.approx(1.0)
    # linear CKA ignores rotations of the channels and a change of sign
    assert float(cka_distill_loss(rotated, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(cka_distill_loss(-t, t)) == pytest.approx(0.0, abs=1e-6)
    # by hand: x = (1, -1, 1, -1), y = (1, 1, -1, -1) are orthogonal -> CKA 0, loss 1;
    # y2 = [(1, 1), (-1, 1), (1, -1), (-1, -1)]: ||y2' x||^2 = 16, ||x'x|| = 4, ||y2'y2|| = sqrt(32) -> CKA 1/sqrt(2)
    x = _maps([1.0], [-1.0], [1.0], [-1.0])
    assert float(cka_distill_loss(x, _maps([1.0], [1.0], [-1.0], [-1.0]))) == pytest.approx(1.0)
    y2 = _maps([1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0])
    assert float(cka_distill_loss(x, y2)) == pytest.approx(1 - 1 / math.sqrt(2))
    # a student map at another resolution is resized to the teacher's
    big = torch.nn.functional.interpolate(t, size=(4, 4), mode="nearest")
    assert float(cosine_distill_loss(big, t)) < 0.1 and float(cka_distill_loss(big, t)) < 0.1


# ----------------------------------------------------------------------------- squeeze levers
def _squeeze(cfg: RunConfig, teacher, generalist=None):
    from xlearner.runs import load_teacher  # noqa: F401 (load_teacher: same freezing)
    from xlearner.stages.squeeze import SqueezeStage

    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    stage = SqueezeStage(cfg, specs(), teacher, generalist)
    return stage.train()


def _same_branches(teacher) -> None:
    """Every teacher branch gets the cls branch's weights (reconciliation is zero at init)."""
    state = teacher.backbones["cls"].state_dict()
    for t in teacher.tasks:
        teacher.backbones[t].load_state_dict(state)


def test_multi_teacher_distillation_is_zero_for_a_student_equal_to_every_teacher():
    cfg = tiny_cfg(**{"squeeze.distill_teachers": "all"})
    teacher = expanded(cfg)
    _same_branches(teacher)
    stage = _squeeze(cfg, teacher)  # copy:cls student, identity adapters
    losses = stage(cls_seg_batch())
    # every branch's adapter is distilled, on every source's images (no det batch here)
    assert {"distill/cls", "distill/det", "distill/seg"} <= set(losses)
    for u in ("cls", "det", "seg"):
        assert losses[f"distill/{u}"].item() == pytest.approx(0.0, abs=1e-6), u
    # a det branch that differs is distilled on the cls and seg images too
    with torch.no_grad():
        for p in teacher.backbones["det"].parameters():
            p.add_(0.1 * torch.randn_like(p))
    stage.refresh_teacher()  # the teacher was edited in place after the stage copied it
    losses = stage(cls_seg_batch())
    assert losses["distill/det"].item() > 1e-3 and losses["distill/cls"].item() == pytest.approx(0.0, abs=1e-6)
    sum(losses.values()).backward()
    assert stage.adapters["det"][0].weight.grad.abs().sum() > 0
    # today's behaviour: a batch of task t is distilled from branch t only
    own = _squeeze(tiny_cfg(), teacher)
    assert set(k for k in own(cls_seg_batch()) if k.startswith("distill/")) == {"distill/cls", "distill/seg"}


def test_teacher_normalised_with_per_source_statistics():
    cfg = tiny_cfg(**{"squeeze.teacher_bn": "source", "squeeze.teacher_bn_batches": 1})
    teacher = expanded(cfg)
    stage = _squeeze(cfg, teacher)
    g = torch.Generator().manual_seed(0)
    images = {"digits": torch.randn(16, 3, SIZE, SIZE, generator=g),
              "scenes": 4.0 * torch.randn(16, 3, SIZE, SIZE, generator=g) + 3.0,
              "regions": torch.rand(16, 3, SIZE, SIZE, generator=g)}
    stage.estimate_source_statistics(loaders={k: [{"images": v}] for k, v in images.items()})
    stats = stage._source_stats
    first_bn_mean = {k: v[0][0] for k, v in stats.items()}
    assert not torch.allclose(first_bn_mean["digits"], first_bn_mean["scenes"])
    # with one estimation batch, eval-mode teacher ~ batch-statistics teacher on that batch
    from xlearner.stages.squeeze import batchnorms, use_batch_statistics, use_statistics

    bns = batchnorms(teacher)
    use_statistics(bns, stats["scenes"])
    with torch.no_grad():
        per_source = teacher.branch_features(images["scenes"], "det")[-1]
        use_batch_statistics(teacher)
        batch_stat = teacher.branch_features(images["scenes"], "det")[-1]
    assert torch.allclose(per_source, batch_stat, rtol=0.05, atol=0.05)
    # in the stage, a batch of source k is normalised with k's statistics
    stage(cls_seg_batch())
    assert not any(m.training for m in bns)
    assert torch.equal(bns[0].running_mean, stats["regions"][0][0])  # the last source of the batch


def test_teacher_batch_statistics_equal_momentum_zero_and_leave_stored_ones():
    """Untracked train-mode BatchNorm (one operator less per call) normalises as momentum 0 did."""
    import copy

    from xlearner.stages.squeeze import batchnorms, use_batch_statistics

    teacher = expanded(tiny_cfg())
    torch.manual_seed(0)
    for m in batchnorms(teacher):  # stored statistics that differ from any batch's
        m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    momentum_zero = copy.deepcopy(teacher)
    for m in batchnorms(momentum_zero):
        m.train(), setattr(m, "momentum", 0.0)
    use_batch_statistics(teacher)
    stored = {k: v.clone() for k, v in teacher.state_dict().items()}
    images = torch.randn(4, 3, SIZE, SIZE)
    with torch.no_grad():
        for task in ("cls", "seg"):
            torch.testing.assert_close(teacher.branch_features(images, task)[-1],
                                       momentum_zero.branch_features(images, task)[-1], rtol=1e-6, atol=1e-6)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in stored.items())  # nor counted batches


@pytest.mark.parametrize("teacher_bn", ["batch", "source"])
def test_a_teacher_kept_in_bf16_gives_the_same_bf16_squeeze_losses_with_fewer_casts(teacher_bn):
    """Autocast casts a frozen fp32 teacher's weights again on every call (it caches only weights that
    require grad); kept in bf16 they need no cast, and the losses and gradients are bit for bit the
    same. With per-source statistics (estimated outside autocast) the teacher stays fp32."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        def __init__(self, frozen: set[int]):
            super().__init__()
            self.casts, self.frozen, self.frozen_casts = 0, frozen, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                self.casts += 1
                self.frozen_casts += id(args[0]) in self.frozen
            return func(*args, **(kwargs or {}))

    def frozen_weights(stage) -> set[int]:
        """The frozen conv and linear weights a step reads: the teacher (as its grouped copy, where it
        runs as one) and its heads (KD)."""
        nets = [stage._grouped if stage._grouped is not None else stage.teacher, stage.teacher.task_heads]
        return {id(p) for net in nets for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                for p in m.parameters(recurse=False)}

    cfg = tiny_cfg(**{"squeeze.kd_weight": 1.0, "squeeze.teacher_bn": teacher_bn, "squeeze.teacher_bn_batches": 1})
    ref = _squeeze(cfg, expanded(cfg))
    kept = copy.deepcopy(ref)
    kept.cast_frozen_for_autocast(torch.bfloat16)
    teacher_dtypes = {m.weight.dtype for m in kept.teacher.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    assert teacher_dtypes == ({torch.bfloat16} if teacher_bn == "batch" else {torch.float32})
    if teacher_bn == "source":
        images = {k: [{"images": torch.randn(4, 3, SIZE, SIZE)}] for k in ("digits", "scenes", "regions")}
        for stage in (ref, kept):
            stage.estimate_source_statistics(loaders=images)
    results = []
    for stage in (ref, kept):
        counter = CountCasts(frozen_weights(stage))
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            losses = stage(cls_seg_batch())
        sum(v.float() for v in losses.values()).backward()
        results.append((losses, {n: p.grad for n, p in stage.named_parameters() if p.grad is not None},
                        counter.casts, counter.frozen_casts))
    (ref_losses, ref_grads, ref_casts, ref_frozen), (losses, grads, casts, frozen) = results
    assert set(losses) == set(ref_losses) and {"distill/cls", "distill/seg"} <= set(losses)
    assert any(k.startswith("kd/") for k in losses), "the teacher's heads (KD) must be in the test"
    for k in ref_losses:
        torch.testing.assert_close(losses[k], ref_losses[k], rtol=0, atol=0, msg=k)
    assert set(grads) == set(ref_grads) and len(grads) > 10
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=0, atol=0, msg=k)
    if teacher_bn == "batch":
        # every frozen weight the fp32 teacher read was cast, once per use; kept in bf16, none is
        assert ref_frozen > 0 and frozen == 0, (ref_frozen, frozen)
        assert ref_casts - casts >= ref_frozen, (ref_casts, casts, ref_frozen)
    else:
        assert casts == ref_casts


def _write_run(run_dir: Path, net, cfg: RunConfig, stage: str) -> Path:
    from xlearner.stages import save_product

    run_dir.mkdir(parents=True)
    save_product(net, run_dir / "model.safetensors")
    (run_dir / "run.json").write_text(json.dumps({"stage": stage, "config": cfg.to_dict()}))
    return run_dir


def test_generalist_teacher_is_distilled_through_its_own_adapters(tmp_path):
    from xlearner.config import ConfigError
    from xlearner.stages.baselines import build_shared_net
    from xlearner.runs import load_generalist, resolve_generalist_dir

    cfg = tiny_cfg(**{"squeeze.generalist": "msmt", "squeeze.generalist_weight": 0.5})
    teacher = expanded(cfg)
    msmt = build_shared_net(cfg, specs())
    msmt.backbone.load_state_dict(teacher.backbones["cls"].state_dict())  # equal to the copy:cls student
    run_dir = _write_run(tmp_path / "msmt", msmt, cfg, "msmt")
    assert resolve_generalist_dir("msmt", run_dir) == run_dir
    with pytest.raises(ConfigError, match="run.json"):
        resolve_generalist_dir("msmt", tmp_path / "nowhere")
    generalist = load_generalist(run_dir)
    stage = _squeeze(cfg, teacher, generalist)
    assert len(stage.generalist_adapters) == len(stage.distill_stages)
    assert not any(k.startswith("generalist.") for k in stage.state_dict())  # frozen, not saved
    losses = stage(cls_seg_batch())
    assert losses["distill/generalist"].item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p in generalist.parameters():
            p.add_(0.1 * torch.randn_like(p))
    losses = stage(cls_seg_batch())
    assert losses["distill/generalist"].item() > 1e-4
    sum(losses.values()).backward()
    assert stage.generalist_adapters[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in generalist.parameters())
    with pytest.raises(ConfigError, match="expansion run"):
        load_generalist(_write_run(tmp_path / "exp", teacher, cfg, "expansion"))


# ----------------------------------------------------------------------------- ablations in the main job
NEW_ABLATIONS = {
    "reconcile_all_stages": ("expansion.reconcile_from", "all"),
    "multi_teacher": ("squeeze.distill_teachers", "all"),
    "teacher_source_bn": ("squeeze.teacher_bn", "source"),
    "generalist_teacher": ("squeeze.generalist", "msmt"),
    "distill_cosine": ("squeeze.distill_loss", "cosine"),
    "distill_cka": ("squeeze.distill_loss", "cka"),
    "distill_l2": ("squeeze.distill_loss", "l2"),  # tested from a config that distils with CKA, as default does
    "kd_logits": ("squeeze.kd_weight", 1.0),
    "distill_weight_x4": ("squeeze.distill_weight", 4.0),
    "distill_weight_x0.25": ("squeeze.distill_weight", 0.25),
    "task_balanced_loss": ("sources.digits.loss_weight", 0.5),  # two cls sources share one unit
    "task_balanced_sampling": ("sources.digits.batch_size", 2),  # (4 + 4 + 2 + 2) / 3 tasks / 2 cls sources
    "seg_linear_head": ("seg_head", "linear"),
}
OWN_EXPANSION = {"reconcile_all_stages", "task_balanced_loss", "task_balanced_sampling", "seg_linear_head"}


@pytest.mark.parametrize("name", sorted(NEW_ABLATIONS))
def test_each_lever_ablation_builds_its_parts(name, tmp_path):
    from xlearner.pipeline import ablation_overrides, build_parts, load_config_like

    two_cls = [{"name": "digits", "task": "cls", "dataset": "mnist", "batch_size": 4},
               {"name": "clothes", "task": "cls", "dataset": "fashion_mnist", "batch_size": 4},
               {"name": "scenes", "task": "det", "dataset": "composed_det_glyphs", "batch_size": 2},
               {"name": "regions", "task": "seg", "dataset": "composed_seg_glyphs", "batch_size": 2}]
    cfg = tiny_cfg(sources=two_cls, **({"squeeze.distill_loss": "cka"} if name == "distill_l2" else {}))
    key, value = NEW_ABLATIONS[name]
    acfg = load_config_like(cfg, ablation_overrides(name, cfg))
    section, *rest = key.split(".")
    if section == "sources":
        assert getattr(acfg.source(rest[0]), rest[1]) == value
    elif not rest:
        assert getattr(acfg, section) == value
    else:
        assert getattr(getattr(acfg, section), rest[0]) == value
    parts, methods = build_parts(cfg, tmp_path, name)
    names = [p.name for p in parts]
    method = f"xlearner[{name}]"
    squeeze_dir = f"ablations/{name}/squeeze"
    assert squeeze_dir in names and f"export {method}" in names
    assert f"transfer {method} -> animal_mnist" in names
    if name in OWN_EXPANSION:  # a lever of the expansion stage (or of the data) trains its own teacher
        assert methods[method] == [f"ablations/{name}/expansion", squeeze_dir]
    elif name == "generalist_teacher":  # its cost includes the generalist's (msmt) training
        assert methods[method] == ["expansion", "msmt", squeeze_dir]
    else:  # a lever of the squeeze stage only distils from the main expansion model
        assert methods[method] == ["expansion", squeeze_dir]
        assert f"ablations/{name}/expansion" not in names
    deps = next(p for p in parts if p.name == squeeze_dir).deps
    if name == "generalist_teacher":
        assert "msmt" in deps and names.index("msmt") < names.index(squeeze_dir)
    for p in parts:  # every part after what it depends on
        assert all(names.index(d) < names.index(p.name) for d in p.deps if d in names), p.name
    # the main X-Learner, the baselines and no imagenet row (the backbone is a ResNet here)
    assert {"xlearner", "ssst", "msmt", "scratch"} <= set(methods) and "imagenet" not in methods


def test_ablation_names_expand_lists_and_the_levers_shorthand():
    from xlearner.pipeline import ABLATIONS, LEVERS, ablation_names

    assert set(LEVERS) == set(NEW_ABLATIONS) and set(LEVERS) <= set(ABLATIONS)
    assert ablation_names(["kd_logits,distill_cka", "kd_logits"]) == ["kd_logits", "distill_cka"]
    assert ablation_names("no_distill,levers")[0] == "no_distill" and len(ablation_names("levers")) == len(LEVERS)
    assert ablation_names(None) == []
    with pytest.raises(ValueError, match="unknown ablation 'kd_logit'.*levers"):
        ablation_names("kd_logit")


def test_several_ablations_in_one_job_add_each_its_parts_once(tmp_path):
    from xlearner.pipeline import build_parts

    cfg = tiny_cfg()
    one = {p.name: p.key for p in build_parts(cfg, tmp_path, "kd_logits")[0]}
    parts, methods = build_parts(cfg, tmp_path, ["kd_logits", "reconcile_all_stages"])
    both = {p.name: p.key for p in parts}
    assert len(both) == len(parts)  # no part twice
    assert {k: v for k, v in both.items() if k in one} == one  # the first ablation's parts are unchanged
    added = set(both) - set(one)
    assert {"ablations/reconcile_all_stages/expansion", "ablations/reconcile_all_stages/squeeze",
            "export xlearner[reconcile_all_stages]"} <= added
    assert all("reconcile_all_stages" in n for n in added)
    assert {"xlearner[kd_logits]", "xlearner[reconcile_all_stages]"} <= set(methods)


def test_parts_of_keeps_only_what_the_wanted_methods_need(tmp_path):
    """lever_seeds.py trains X-Learner and a lever without the baselines: their stages, exports and
    transfers, nothing of any other method."""
    from xlearner.pipeline import build_parts, parts_of

    cfg = tiny_cfg()
    parts, methods = build_parts(cfg, tmp_path, "generalist_teacher")
    wanted = ["xlearner", "xlearner[generalist_teacher]"]
    names = [p.name for p in parts_of(parts, methods, wanted)]
    stages = {"expansion", "squeeze", "msmt", "ablations/generalist_teacher/squeeze"}  # msmt: the generalist
    expected = stages | {f"export {m}" for m in wanted} | {
        f"transfer {m} -> {d}" for m in wanted for d in cfg.transfer.datasets}
    assert set(names) == expected and len(names) == len(expected)
    assert names == [p.name for p in parts if p.name in expected]  # the job's order kept


def test_cli_reads_repeated_and_comma_separated_ablations(capsys):
    from xlearner.cli import build_parser

    args = build_parser().parse_args(["run", "--ablation", "kd_logits,distill_cka", "--ablation", "levers",
                                      "train.steps=5"])
    assert args.ablation[:2] == ["kd_logits", "distill_cka"] and "reconcile_all_stages" in args.ablation
    assert args.overrides == ["train.steps=5"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--ablation", "nope"])
    assert "unknown ablation 'nope'" in capsys.readouterr().err


def test_balance_ablations_change_weights_and_batches():
    from xlearner.pipeline import ablation_overrides, load_config_like

    cfg = tiny_cfg(**{"sources": [
        {"name": "a", "task": "cls", "dataset": "mnist", "batch_size": 32},
        {"name": "b", "task": "cls", "dataset": "fashion_mnist", "batch_size": 32},
        {"name": "c", "task": "det", "dataset": "composed_det_glyphs", "batch_size": 8},
        {"name": "d", "task": "seg", "dataset": "composed_seg_glyphs", "batch_size": 8}]})
    loss = load_config_like(cfg, ablation_overrides("task_balanced_loss", cfg))
    assert [s.loss_weight for s in loss.sources] == [0.5, 0.5, 1.0, 1.0]
    sampling = load_config_like(cfg, ablation_overrides("task_balanced_sampling", cfg))
    assert [s.batch_size for s in sampling.sources] == [13, 13, 27, 27]  # 80 images a step, a third per task


def test_pretrained_backbone_adds_the_imagenet_method(tmp_path):
    from xlearner.pipeline import build_parts

    cfg = tiny_cfg(**{"backbone": {"name": "tv:mobilenet_v2", "weights": "imagenet"}})
    parts, methods = build_parts(cfg, tmp_path)
    names = [p.name for p in parts]
    assert methods["imagenet"] == []  # no training stage here: its ImageNet cost is external
    assert "export imagenet" in names and "transfer imagenet -> nuclei" in names
    assert not next(p for p in parts if p.name == "export imagenet").deps
    off = tiny_cfg(**{"backbone": {"name": "tv:mobilenet_v2"}, "baselines.imagenet": False})
    assert "imagenet" not in build_parts(off, tmp_path)[1]
    narrow = tiny_cfg(**{"backbone": {"name": "tv:mobilenet_v2", "kwargs": {"width_mult": 0.5}}})
    assert "imagenet" not in build_parts(narrow, tmp_path)[1]


def test_scratch_stays_random_when_the_others_start_pretrained(tmp_path, embedded_home):
    from safetensors.torch import load_file

    from xlearner.pipeline import build_parts, run_part

    embedded_home("mnist")
    cfg = tiny_cfg(**{"backbone": {"name": "tv:mobilenet_v2", "weights": "imagenet"},
                      "sources": [{"name": "digits", "task": "cls", "dataset": "mnist", "batch_size": 4}]})
    parts, _ = build_parts(cfg, tmp_path)
    run_part(next(p for p in parts if p.name == "scratch"), cfg)
    run_part(next(p for p in parts if p.name == "export imagenet"), cfg)
    scratch = load_file(str(tmp_path / "scratch" / "model.safetensors"))["backbone.features.0.0.weight"]
    imagenet = load_file(str(tmp_path / "backbones" / "imagenet.safetensors"))["features.0.0.weight"]
    from xlearner.data.pretrained import imagenet_weights_path

    ref = torch.load(str(imagenet_weights_path()), map_location="cpu", weights_only=True)["features.0.0.weight"]
    assert torch.equal(imagenet, ref) and not torch.equal(scratch, ref)


@pytest.mark.parametrize("name,expansion,squeeze", [("split_25_75", 130, 390), ("split_75_25", 390, 130)])
def test_budget_split_levers_keep_x_learners_total_steps(name, expansion, squeeze):
    """The split of X-Learner's budget: default's 260 + 260 steps moved between its two stages, the
    total unchanged, read by the stages themselves (and by nothing else: the baselines keep theirs)."""
    from xlearner.config import load_config
    from xlearner.pipeline import ablation_overrides, load_config_like
    from xlearner.stages import STAGES

    cfg = load_config("default")
    acfg = load_config_like(cfg, ablation_overrides(name, cfg))
    assert (STAGES["expansion"].steps(acfg), STAGES["squeeze"].steps(acfg)) == (expansion, squeeze)
    assert (STAGES["expansion"].steps(cfg), STAGES["squeeze"].steps(cfg)) == (260, 260)
    assert STAGES["msmt"].steps(acfg) == STAGES["msmt"].steps(cfg) == 520
