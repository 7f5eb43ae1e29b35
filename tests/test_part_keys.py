"""The keys of the main job's parts: what a rerun skips (issue #7, item 6).

A part is skipped when its stored key equals its key under the new config, so a key must
change exactly when something the part's output depends on changes: too few changes reuse
stale results, too many retrain for nothing. Only ``build_parts(cfg, out, ablation)`` ->
(parts with ``.name``/``.key``, methods) is used; no hash value is written down here.
"""
from pathlib import Path

import pytest

# one import per name: the pipeline's internals may move (one-line change here)
from xlearner.config import load_config
from xlearner.pipeline import ABLATIONS, build_parts

STAGES = {"expansion", "squeeze", "ssst", "msst_cls", "msst_det", "msst_seg", "msmt", "scratch"}
TEACHERS = ["xlearner.expansion[cls]", "xlearner.expansion[det]", "xlearner.expansion[seg]"]  # branches as backbones
METHODS = ["xlearner", *TEACHERS, "ssst", "msst_cls", "msst_det", "msst_seg", "msmt", "scratch"]
OUT = Path("/nonexistent/xlearner-run")  # building the parts touches no file


def _cfg(*overrides, preset="quick"):
    return load_config(preset, list(overrides))


DATASETS = list(_cfg().transfer.datasets)


def _keys(cfg, ablation=None, out=OUT) -> dict[str, str]:
    parts, _ = build_parts(cfg, out, ablation)
    names = [p.name for p in parts]
    assert len(names) == len(set(names)), f"two parts share a name: {names}"
    keys = [p.key for p in parts]
    assert len(keys) == len(set(keys)), "two different parts share a key"
    return {p.name: p.key for p in parts}


def _methods(cfg, ablation=None) -> dict[str, list[str]]:
    return build_parts(cfg, OUT, ablation)[1]


def _changed(a: dict, b: dict) -> set[str]:
    assert a.keys() == b.keys()
    return {n for n in a if a[n] != b[n]}


def _export_transfers(method: str) -> set[str]:
    return {f"export {method}"} | {f"transfer {method} -> {d}" for d in DATASETS}


TRANSFERS = {f"transfer {m} -> {d}" for m in METHODS for d in DATASETS}
EVERYTHING = STAGES | {n for m in METHODS for n in _export_transfers(m)}
XLEARNER_PRODUCT = _export_transfers("xlearner")
TEACHER_PRODUCTS = {n for m in TEACHERS for n in _export_transfers(m)}


@pytest.fixture(scope="module")
def base():
    return _keys(_cfg())


def test_parts_of_the_quick_job(base):
    assert set(base) == EVERYTHING
    assert _methods(_cfg()) == {"xlearner": ["expansion", "squeeze"], **{m: ["expansion"] for m in TEACHERS},
                                **{m: [m] for m in METHODS[4:]}}


def test_teacher_rows_are_the_expansion_branches_and_can_be_turned_off(base):
    """Each teacher row exports one branch of the main expansion model; ``baselines.teachers=false``
    drops exactly their exports and transfers, and re-keys nothing else."""
    parts = {p.name: p for p in build_parts(_cfg(), OUT)[0]}
    for task, m in zip(("cls", "det", "seg"), TEACHERS):
        export = parts[f"export {m}"]
        assert (export.branch, export.source, export.deps) == (task, OUT / "expansion", ["expansion"])
    without = _keys(_cfg("baselines.teachers=false"))
    assert set(base) - set(without) == TEACHER_PRODUCTS and set(without) <= set(base)
    assert all(base[n] == k for n, k in without.items())


def test_keys_are_stable_and_independent_of_the_output_folder(base):
    assert _keys(_cfg()) == base
    # a run folder moved elsewhere is still recognised as finished
    assert _keys(_cfg(), out=Path("/elsewhere/run")) == base


@pytest.mark.parametrize("override,expected", [
    # squeeze settings: the student, hence xlearner's exported backbone and its transfers
    ("squeeze.distill_weight=0.5", {"squeeze"} | XLEARNER_PRODUCT),
    ("squeeze.kd_weight=1.0", {"squeeze"} | XLEARNER_PRODUCT),
    ("squeeze.distill_loss=l2", {"squeeze"} | XLEARNER_PRODUCT),
    # transfer settings: every transfer, no training, no export
    ("transfer.steps=21", TRANSFERS),
    ("transfer.lr=0.001", TRANSFERS),
    ("transfer.seg_head=linear", TRANSFERS),
    ("transfer.eval_split=val", TRANSFERS),
    # expansion settings: the teacher, hence the student; no baseline
    ("expansion.detach_others=false", {"expansion", "squeeze"} | XLEARNER_PRODUCT | TEACHER_PRODUCTS),
    ("expansion.reconcile_from=all", {"expansion", "squeeze"} | XLEARNER_PRODUCT | TEACHER_PRODUCTS),
    # the split of X-Learner's budget: its stages only (the squeeze learns from the re-keyed expansion)
    ("expansion.steps=40", {"expansion", "squeeze"} | XLEARNER_PRODUCT | TEACHER_PRODUCTS),
    ("squeeze.steps=40", {"squeeze"} | XLEARNER_PRODUCT),
    # shared training settings and data: every stage, hence everything downstream of them
    ("train.steps=31", EVERYTHING),
    ("train.lr=0.001", EVERYTHING),
    ("sources.glyph_det.batch_size=2", EVERYTHING),
    ("seed=1", EVERYTHING),
    # the upstream seg head and its loss: every stage (the stages share one key of the upstream settings)
    ("seg_head=fpn", EVERYTHING),
    ("seg_loss_points=100", EVERYTHING),
    # settings no result depends on: display, checkpoint frequency, loader workers, the compile mode, the
    # teacher folder (the main job sets it)
    ("train.progress=false", set()),
    ("train.log_every=7", set()),
    ("train.ckpt_every=7", set()),
    ("train.num_workers=2", set()),
    ("train.compile_mode=reduce-overhead", set()),
    ("squeeze.teacher=/elsewhere/expansion", set()),
    # a baseline's own choice re-keys that baseline only (and what it exports and transfers)
    ("baselines.ssst_source=mnist", {"ssst"} | _export_transfers("ssst")),
    ("baselines.imagenet=false", set()),  # no imagenet method in quick (not a MobileNetV2)
    # the baselines' step count: every trained baseline, not X-Learner's stages nor scratch
    ("baselines.steps=13", {n for m in ("ssst", "msst_cls", "msst_det", "msst_seg", "msmt")
                            for n in {m} | _export_transfers(m)}),
    # report-only settings and the run's display name: nothing
    ("gates.separation_points=7", set()),
    ("gates.upstream.fashion=80", set()),
    ("gates.min_seeds=5", set()),
    ("name=renamed", set()),
])
def test_a_changed_key_rekeys_exactly_the_parts_that_depend_on_it(base, override, expected):
    changed = _changed(base, _keys(_cfg(override)))
    assert changed == expected, (f"{override}: re-keyed but should not: {sorted(changed - expected)}; "
                                 f"should re-key but did not: {sorted(expected - changed)}")


def test_dropping_a_transfer_dataset_keeps_every_other_transfer(base):
    """Each transfer part is keyed by its own dataset: the list of datasets re-keys no other part."""
    fewer = _keys(_cfg(f"transfer.datasets=[{','.join(DATASETS[1:])}]"))
    assert set(base) - set(fewer) == {f"transfer {m} -> {DATASETS[0]}" for m in METHODS}
    assert all(fewer[n] == base[n] for n in fewer)


def test_every_stage_part_changes_with_train_steps(base):
    changed = _changed(base, _keys(_cfg("train.steps=31")))
    assert STAGES <= changed


# ----------------------------------------------------------------------------- ablations
def _abl(name: str, *stages: str) -> set[str]:
    return {f"ablations/{name}/{s}" for s in stages} | _export_transfers(f"xlearner[{name}]")


SQUEEZE_ONLY = ["squeeze_scratch", "no_distill", "multi_teacher", "teacher_source_bn", "generalist_teacher",
                "distill_cosine", "distill_l2", "kd_logits", "distill_weight_x4", "distill_weight_x0.25"]
RETRAIN_EXPANSION = ["no_reconciliation", "no_detach", "reconcile_all_stages",
                     "task_balanced_loss", "task_balanced_sampling", "seg_fpn_head"]  # expansion, source or head settings

EXTRA_PARTS = {
    # squeeze settings only: a new student distilled from the main expansion model
    **{n: _abl(n, "squeeze") for n in SQUEEZE_ONLY},
    # expansion (or source) settings: a new expansion model and a student of it
    **{n: _abl(n, "expansion", "squeeze") for n in RETRAIN_EXPANSION},
    # the main expansion model's cls branch: the teacher row xlearner.expansion[cls] already (skipped)
    "expansion_direct": set(),
    # X-Learner's steps split otherwise between its stages: both again
    "split_25_75": _abl("split_25_75", "expansion", "squeeze"),
    "split_75_25": _abl("split_75_25", "expansion", "squeeze"),
    # quick's seg head is already the linear one, its distillation already CKA: these change nothing and are skipped
    "seg_linear_head": set(),
    "distill_cka": set(),
}
METHOD_STAGES = {
    **{n: ["expansion", f"ablations/{n}/squeeze"] for n in SQUEEZE_ONLY},
    "generalist_teacher": ["expansion", "msmt", "ablations/generalist_teacher/squeeze"],  # MSMT is a teacher
    **{n: [f"ablations/{n}/expansion", f"ablations/{n}/squeeze"] for n in RETRAIN_EXPANSION},
    "split_25_75": ["ablations/split_25_75/expansion", "ablations/split_25_75/squeeze"],
    "split_75_25": ["ablations/split_75_25/expansion", "ablations/split_75_25/squeeze"],
}


NO_OP_IN_QUICK = {"seg_linear_head", "distill_cka", "expansion_direct"}


def test_every_ablation_has_an_expectation():
    assert set(EXTRA_PARTS) == set(ABLATIONS)


@pytest.mark.filterwarnings("ignore:ablation (seg_linear_head|distill_cka) changes nothing")
@pytest.mark.filterwarnings("ignore:ablation expansion_direct is the teacher row")
@pytest.mark.parametrize("name", sorted(ABLATIONS))
def test_an_ablation_adds_exactly_its_own_parts_and_leaves_the_main_keys(base, name):
    keys = _keys(_cfg(), ablation=name)
    extra = set(keys) - set(base)
    assert extra == EXTRA_PARTS[name], (f"{name}: unexpected {sorted(extra - EXTRA_PARTS[name])}; "
                                        f"missing {sorted(EXTRA_PARTS[name] - extra)}")
    assert set(base) <= set(keys)
    assert {n: keys[n] for n in base} == base  # the main parts are reused as they are
    methods = _methods(_cfg(), ablation=name)
    if name in NO_OP_IN_QUICK:
        assert f"xlearner[{name}]" not in methods and set(methods) == {"xlearner", *METHODS[1:]}
        return
    assert methods[f"xlearner[{name}]"] == METHOD_STAGES[name]
    assert set(methods) == {"xlearner", *METHODS[1:], f"xlearner[{name}]"}


def test_an_ablation_that_changes_nothing_is_skipped_with_a_warning():
    """quick's upstream seg head is already linear: ``seg_linear_head`` would train X-Learner twice."""
    with pytest.warns(UserWarning, match="seg_linear_head changes nothing in this config.*skipped"):
        parts, methods = build_parts(_cfg(), OUT, ["seg_linear_head", "seg_fpn_head"])
    assert "xlearner[seg_linear_head]" not in methods and "xlearner[seg_fpn_head]" in methods
    assert not any(p.name.startswith("ablations/seg_linear_head") for p in parts)


def test_squeeze_ablation_follows_the_main_expansion_model():
    """A squeeze-only ablation is distilled from the main expansion model: it re-keys with it."""
    base = _keys(_cfg(), ablation="distill_l2")
    own = _abl("distill_l2", "squeeze")
    changed = _changed(base, _keys(_cfg("expansion.reconcile_from=all"), ablation="distill_l2"))
    assert changed == {"expansion", "squeeze"} | XLEARNER_PRODUCT | TEACHER_PRODUCTS | own
    changed = _changed(base, _keys(_cfg("squeeze.kd_weight=0.5"), ablation="distill_l2"))
    assert changed == {"squeeze"} | XLEARNER_PRODUCT | own
    changed = _changed(base, _keys(_cfg("transfer.steps=21"), ablation="distill_l2"))
    assert changed == TRANSFERS | {f"transfer xlearner[distill_l2] -> {d}" for d in DATASETS}
    assert _changed(base, _keys(_cfg("gates.separation_points=9"), ablation="distill_l2")) == set()


def test_expansion_direct_follows_the_expansion_model_not_the_squeeze_settings():
    """Without teacher rows, ``expansion_direct`` exports the main expansion model's cls branch."""
    off = "baselines.teachers=false"
    base = _keys(_cfg(off), ablation="expansion_direct")
    own = _abl("expansion_direct")
    assert own <= set(base)
    assert _changed(base, _keys(_cfg(off, "squeeze.distill_weight=0.5"), ablation="expansion_direct")) == \
        {"squeeze"} | XLEARNER_PRODUCT
    assert _changed(base, _keys(_cfg(off, "expansion.detach_others=false"), ablation="expansion_direct")) == \
        {"expansion", "squeeze"} | XLEARNER_PRODUCT | own


def test_generalist_teacher_squeeze_follows_the_msmt_baseline():
    """The generalist ablation's student is distilled from MSMT too: whatever re-keys MSMT re-keys it."""
    base = _keys(_cfg(), ablation="generalist_teacher")
    student = "ablations/generalist_teacher/squeeze"
    for override in ("baselines.imagenet=false", "baselines.ssst_source=mnist", "expansion.reconcile_from=all",
                     "train.steps=31", "gates.min_seeds=5"):
        changed = _changed(base, _keys(_cfg(override), ablation="generalist_teacher"))
        assert (student in changed) == ("msmt" in changed or "squeeze" in changed), override
    # the same squeeze settings without the generalist give another key
    plain = _keys(_cfg("squeeze.generalist=msmt"))  # the main job itself with a generalist teacher
    assert plain["squeeze"] == base[student]
    assert base[student] != base["squeeze"]


# ----------------------------------------------------------------------------- the untouched ImageNet model
def test_imagenet_method_has_no_stage_and_rekeys_with_transfer_settings_only():
    base = _keys(_cfg(preset="pretrained"))
    own = {"export imagenet"} | {f"transfer imagenet -> {d}" for d in _cfg(preset="pretrained").transfer.datasets}
    assert own <= set(base) and "imagenet" not in base
    assert _methods(_cfg(preset="pretrained"))["imagenet"] == []
    changed = _changed(base, _keys(_cfg("train.steps=31", preset="pretrained")))
    assert not changed & own
    changed = _changed(base, _keys(_cfg("transfer.steps=21", preset="pretrained")))
    assert {f"transfer imagenet -> {d}" for d in _cfg(preset="pretrained").transfer.datasets} <= changed
    assert "export imagenet" not in changed
    changed = _changed(base, _keys(_cfg("backbone.out_indices=[1,2,3,4]", preset="pretrained")))
    assert own <= changed  # another cut of the model: another exported backbone


def test_imagenet_transfers_rekey_with_the_transfer_neck_width():
    """transfer_one sizes the det/seg necks by fpn_channels and augments by ``augment``: the imagenet
    method, which has no stage key carrying them, must re-key on them too (a fixed defect)."""
    base = _keys(_cfg(preset="pretrained"))
    changed = _changed(base, _keys(_cfg("fpn_channels=32", preset="pretrained")))
    dense = {f"transfer imagenet -> {d}" for d in ("composed_det_animals", "composed_seg_animals")}
    assert dense <= changed


def test_run_methods_option_refuses_an_unknown_method_before_training(tmp_path, capsys):
    """`xlearner run --methods` names the run's methods; a misspelt one is a usage error (exit 2)
    that lists them, before any part runs."""
    from xlearner.cli import main

    assert main(["run", "--preset", "quick", "--out", str(tmp_path / "r"), "--methods", "xlearner,msmtt"]) == 2
    err = capsys.readouterr().err
    assert "msmtt" in err and "xlearner.expansion[det]" in err and "msst_seg" in err
    assert not (tmp_path / "r" / "expansion").exists()
