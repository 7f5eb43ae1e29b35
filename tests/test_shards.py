"""Packed shards (`xlearner data pack`, `format: shards`): the same samples as the source, whole shards
per rank, `data check` on shards, and damage found."""
import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from xlearner import cli
from xlearner.config import SourceConfig
from xlearner.data.check import check_source
from xlearner.data.loader import ShardedInfiniteSampler
from xlearner.data.schema import BadSampleError
from xlearner.data.sources import build_source, open_source, pack_source


def _jpeg(path, h, w, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def imagefolder(tmp_path, n=7):
    for i in range(n):
        _jpeg(tmp_path / "imgs" / ("cat" if i % 2 else "dog") / f"{i}.jpg", 12 + i, 16, i)
    return SourceConfig(name="pets", task="cls", format="imagefolder", root=tmp_path / "imgs", val_fraction=0.3)


def coco(tmp_path, n=5):
    images, anns = [], []
    for i in range(n):
        _jpeg(tmp_path / "coco" / f"{i}.jpg", 20, 24, 10 + i)
        images.append({"id": 100 + i, "file_name": f"{i}.jpg", "width": 24, "height": 20})
        anns.append({"id": i + 1, "image_id": 100 + i, "category_id": 3 + i % 2, "bbox": [1, 2, 10 + i, 8],
                     "area": 80, "iscrowd": 0})
    anns.append({"id": 99, "image_id": 100, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 1})
    ann = tmp_path / "coco.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": [{"id": 3, "name": "a"}, {"id": 4, "name": "b"}]}))
    return SourceConfig(name="boxes", task="det", format="coco", root=tmp_path / "coco", annotations=ann,
                        val_root=tmp_path / "coco", val_annotations=ann)


def masks(tmp_path, n=4):
    rng = np.random.default_rng(0)
    (tmp_path / "m").mkdir()
    for i in range(n):
        _jpeg(tmp_path / "im" / f"{i}.jpg", 10, 14, 20 + i)
        Image.fromarray(rng.integers(0, 4, (10, 14), dtype=np.uint8)).save(tmp_path / "m" / f"{i}.png")
    return SourceConfig(name="parts", task="seg", format="maskfolder", root=tmp_path / "im", masks=tmp_path / "m",
                        class_names=["a", "b", "c"], reduce_zero_label=True, val_fraction=0.25)


def shards_of(cfg, out, **kw):
    pack_source(cfg, out, echo=lambda _: None, **kw)
    return SourceConfig(name=cfg.name, task=cfg.task, format="shards", root=out)


def same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("make", [imagefolder, coco, masks])
def test_packed_source_reads_sample_for_sample_as_the_source(tmp_path, make):
    cfg = make(tmp_path)
    packed = shards_of(cfg, tmp_path / "packed", shard_samples=2)
    for split in ("train", "val", "test"):
        want, got = open_source(cfg, split), open_source(packed, split)
        assert len(got) == len(want) and got.class_names == want.class_names, split
        for i in range(len(want)):
            assert same(want[i], got[i]), (split, i)
    if cfg.task == "det":  # scored against a copy of the same annotation file (its crowd box too)
        got = open_source(packed, "val")
        assert json.loads(got.coco_file.read_text()) == json.loads(cfg.val_annotations.read_text())
        assert got.category_ids == [3, 4]
    assert len(open_source(packed, "train").shard_sizes) > 1


def test_pack_command_writes_a_source_yaml_that_trains_from_the_shards(tmp_path, capsys):
    cfg = masks(tmp_path)
    (tmp_path / "src.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    assert cli.main(["data", "pack", str(tmp_path / "src.yaml"), "--out", str(tmp_path / "p"),
                     "--shard-samples", "2"]) == 0
    assert "train from them with the source" in capsys.readouterr().out
    assert cli.main(["data", "check", str(tmp_path / "p" / "source.yaml")]) == 0
    out = capsys.readouterr().out
    assert "0 problems" in out and "[train] 3 records, 3 classes" in out
    again = cli.main(["data", "pack", str(tmp_path / "src.yaml"), "--out", str(tmp_path / "p")])
    assert again != 0 and "already holds a packed source" in capsys.readouterr().err


def test_check_finds_a_changed_shard_and_training_names_it(tmp_path):
    packed = shards_of(imagefolder(tmp_path), tmp_path / "p", shard_samples=2)
    shard = sorted((tmp_path / "p").glob("train-*.tar"))[1]
    data = bytearray(shard.read_bytes())
    start = data.index(b"\xff\xd8\xff")  # the first JPEG in the shard: no longer a JPEG
    data[start:start + 64] = b"\0" * 64
    shard.write_bytes(bytes(data))
    lines = []
    assert check_source(packed, echo=lines.append) >= 1
    assert any("sha256 is not the manifest's" in ln and shard.name in ln for ln in lines)
    with pytest.raises(BadSampleError, match=shard.name):
        for i in range(len(ds := open_source(packed, "train"))):
            ds[i]


def test_unfinished_pack_is_named(tmp_path):
    packed = shards_of(imagefolder(tmp_path), tmp_path / "p")
    (tmp_path / "p" / "manifest.json").unlink()
    with pytest.raises(BadSampleError, match="the pack did not finish"):
        open_source(packed, "train")


def test_ranks_read_whole_disjoint_shards_and_resume_mid_pass(tmp_path):
    sizes = [5, 5, 5, 5, 3]
    starts = np.cumsum([0] + sizes)
    shard_of = lambda i: int(np.searchsorted(starts, i, side="right")) - 1  # noqa: E731
    for epoch in range(3):
        per_rank = [ShardedInfiniteSampler(23, seed=1, source="s", rank=r, world_size=2,
                                           shard_sizes=sizes).shard(epoch) for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1]) == 12
        files = [{shard_of(i) for i in idx} for idx in per_rank]
        assert not files[0] & files[1] and files[0] | files[1] == set(range(5))
    s = ShardedInfiniteSampler(23, seed=1, source="s", rank=1, world_size=2, shard_sizes=sizes)
    stream = [x for _, x in zip(range(30), s)]
    resumed = ShardedInfiniteSampler(23, seed=1, source="s", rank=1, world_size=2, shard_sizes=sizes, start=17)
    assert [x for _, x in zip(range(13), resumed)] == stream[17:]
    one = ShardedInfiniteSampler(23, seed=1, source="s", shard_sizes=sizes)  # one rank: the plain permutation
    assert one.shard(0) == ShardedInfiniteSampler(23, seed=1, source="s").shard(0)


def test_a_subset_of_shards_has_no_shard_layout(tmp_path):
    packed = shards_of(imagefolder(tmp_path, n=9), tmp_path / "p", shard_samples=2)
    subset = build_source(packed.model_copy(update={"max_samples": 3}), "train")
    assert len(subset) == 3 and getattr(subset, "shard_sizes", None) is None


@pytest.mark.slow
def test_training_from_shards_is_training_from_files_and_resumes_exactly_after_kill_9(tmp_path):
    """One process: the packed sources train exactly as their files (same samples, order, augmentation,
    validation); a run killed with SIGKILL between checkpoints resumes to the same losses and weights."""
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import faults

    torch.set_num_threads(1)
    (tmp_path / "files").mkdir()
    (tmp_path / "shards").mkdir()
    files_cfg = faults.write_config(tmp_path / "files")
    shards_cfg = faults.write_config(tmp_path / "shards", shards=True)
    assert "format: shards" in shards_cfg.read_text()
    runs = {}
    for name, config in (("files", files_cfg), ("shards", shards_cfg)):
        run = faults.Run(config, tmp_path / f"{name}_ref", resume=False, spawn=False)
        assert run.wait() == 0, (tmp_path / f"{name}_ref.console").read_text()[-3000:]
        runs[name] = faults.results(tmp_path / f"{name}_ref")
    (losses, vals, weights), (s_losses, s_vals, s_weights) = runs["files"], runs["shards"]
    assert s_losses == losses and s_vals == vals and len(losses) == faults.STEPS
    assert all(torch.equal(s_weights[k], weights[k]) for k in weights)

    killed = tmp_path / "shards_killed"
    where = faults.kill_run(shards_cfg, killed, "between", random.Random(3), spawn=False, step_s=0.05)
    assert "between writes" in where, where
    assert faults.Run(shards_cfg, killed, resume=True, spawn=False).wait() == 0
    k_losses, k_vals, k_weights = faults.results(killed)
    assert k_losses == s_losses and k_vals == s_vals
    assert all(torch.equal(k_weights[k], s_weights[k]) for k in s_weights)


@pytest.mark.slow
def test_two_gloo_ranks_train_on_disjoint_shards_and_a_killed_rank_resumes_identically(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import faults

    config = faults.write_config(tmp_path, shards=True)
    cfg = yaml.safe_load(config.read_text())
    for src in cfg["sources"]:  # what each rank's loader reads: whole shards, none read by both
        ds = build_source(SourceConfig(**src), "train")
        per_rank = [ShardedInfiniteSampler(len(ds), seed=0, source=src["name"], rank=r, world_size=2,
                                           shard_sizes=ds.shard_sizes).shard(0) for r in range(2)]
        shards = [{ds.locate(i)[0] for i in idx} for idx in per_rank]
        assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == len(ds.shard_sizes) > 1
    steps = 10
    ref = faults.torchrun(config, tmp_path / "ref", steps, restarts=0)
    assert ref.wait() == 0, (tmp_path / "ref.console").read_text()[-3000:]
    where = faults.kill_one_rank(config, tmp_path / "killed", steps, rank=1, after=4)
    assert "resumed from the checkpoint" in where, (tmp_path / "killed.console").read_text()[-3000:]
    ref_losses, ref_vals, ref_w = faults.results(tmp_path / "ref")
    losses, vals, w = faults.results(tmp_path / "killed")
    assert sorted(losses) == list(range(1, steps + 1)) and losses == ref_losses and vals == ref_vals
    assert all(torch.equal(w[k], ref_w[k]) for k in ref_w)


def test_an_embedded_source_packs_its_decoded_images_and_reads_them_back(tmp_path, embedded_home):
    embedded_home("sklearn_digits")
    cfg = SourceConfig(name="digits", task="cls", format="embedded", dataset="sklearn_digits")
    packed = shards_of(cfg, tmp_path / "p", shard_samples=500)
    for split in ("train", "val", "test"):
        want, got = open_source(cfg, split), open_source(packed, split)
        assert len(got) == len(want) and got.class_names == want.class_names
        for i in (0, len(want) // 2, len(want) - 1):
            assert same(want[i], got[i]), (split, i)
