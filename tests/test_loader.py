"""MultiSourceLoader: every source each step, disjoint rank shards, exact resume, determinism."""
import pytest
import torch

from xlearner.config import AugmentConfig
from xlearner.data.loader import MultiSourceLoader, ShardedInfiniteSampler, eval_loader
from xlearner.data.transforms import build_transform


class TinyDataset(torch.utils.data.Dataset):
    """Images whose first pixel encodes the index, so a batch tells which records it holds."""

    def __init__(self, task, n, size=20, name="tiny"):
        self.task, self.n, self.size, self.name = task, n, size, name
        self.class_names = ["a", "b", "c"]
        self.num_classes = 3

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        img = torch.randint(0, 256, (3, self.size, self.size + 4), generator=g, dtype=torch.uint8)
        if self.task == "cls":
            return img, {"label": i % 3}
        if self.task == "det":
            return img, {"boxes": torch.tensor([[2.0, 3.0, 12.0, 15.0]]), "labels": torch.tensor([i % 3])}
        mask = torch.zeros(self.size, self.size + 4, dtype=torch.int64)
        mask[4:10, 5:15] = 1 + i % 2
        return img, {"mask": mask}


AUG = {"cls": AugmentConfig(random_resized_crop=(0.5, 1.0), hflip=True),
       "det": AugmentConfig(hflip=True),
       "seg": AugmentConfig(random_resized_crop=(0.6, 1.0), hflip=True)}


def make_loader(seed=0, num_workers=0, rank=0, world_size=1, transform=True):
    tasks = {"c": "cls", "d": "det", "s": "seg"}
    datasets = {"c": TinyDataset("cls", 13), "d": TinyDataset("det", 7), "s": TinyDataset("seg", 5)}
    transforms = {k: build_transform(t, 16, train=True, augment=AUG[t]) for k, t in tasks.items()} if transform else None
    return MultiSourceLoader(datasets, {"c": 4, "d": 3, "s": 2}, transforms, tasks, seed=seed,
                             rank=rank, world_size=world_size, num_workers=num_workers)


def flat(batch):
    out = []
    for name in sorted(batch):
        b = batch[name]
        out.append(b["images"])
        if "labels" in b:
            out.append(b["labels"])
        if "masks" in b:
            out.append(b["masks"])
        for t in b.get("targets", []):
            out += [t["boxes"], t["labels"]]
        if "boxes" in b:
            out += [b["boxes"], b["labels"]]
    return out


def same(a, b):
    fa, fb = flat(a), flat(b)
    return len(fa) == len(fb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(fa, fb))


def test_every_source_every_step_with_layouts():
    loader = make_loader()
    for _ in range(8):  # crosses several passes of the small sources
        batch = next(loader)
        assert set(batch) == {"c", "d", "s"}
        assert batch["c"]["images"].shape == (4, 3, 16, 16) and batch["c"]["images"].dtype == torch.float32
        assert batch["c"]["labels"].shape == (4,) and batch["c"]["labels"].dtype == torch.int64
        d = batch["d"]  # training layout: boxes padded to the batch's most, labels -1 after each image's
        assert d["images"].shape == (3, 3, 16, 16) and d["boxes"].shape[:1] == (3,) and d["boxes"].shape[2] == 4
        assert d["boxes"].dtype == torch.float32 and d["labels"].dtype == torch.int64
        assert d["labels"].shape == d["boxes"].shape[:2] and (d["labels"] >= 0).any()
        assert batch["s"]["masks"].shape == (2, 16, 16) and batch["s"]["masks"].dtype == torch.int64
    assert loader.state_dict() == {"c": 8, "d": 8, "s": 8}


def test_ranks_get_disjoint_shards_covering_the_data():
    n = 12
    for epoch_start in (0, 6, 12):  # each pass reshuffles, shards stay disjoint
        seen = []
        for rank in range(2):
            s = ShardedInfiniteSampler(n, seed=3, source="x", rank=rank, world_size=2, start=epoch_start)
            it = iter(s)
            seen.append([next(it)[0] for _ in range(6)])
        assert set(seen[0]).isdisjoint(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(n))
    # passes differ (reshuffled)
    it = iter(ShardedInfiniteSampler(n, seed=3, source="x"))
    p1, p2 = [next(it)[0] for _ in range(n)], [next(it)[0] for _ in range(n)]
    assert sorted(p1) == sorted(p2) == list(range(n)) and p1 != p2
    # odd n: padded by wrap-around, equal length per rank
    s0 = ShardedInfiniteSampler(7, seed=0, source="x", rank=0, world_size=2)
    s1 = ShardedInfiniteSampler(7, seed=0, source="x", rank=1, world_size=2)
    assert s0.per_rank == s1.per_rank == 4
    assert set(s0.shard(0)) | set(s1.shard(0)) == set(range(7))


def test_two_rank_loaders_disjoint_batches():
    l0, l1 = make_loader(rank=0, world_size=2, transform=False), make_loader(rank=1, world_size=2, transform=False)
    # TinyDataset "c" has 13 records: per rank 7 per pass, cls batch 4 -> look at the first 4 of each rank
    a, b = next(l0)["c"]["images"], next(l1)["c"]["images"]
    assert not any(torch.equal(x, y) for x in a for y in b)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly(num_workers):
    k, more = 3, 4
    full = make_loader(seed=1, num_workers=num_workers)
    ref = [next(full) for _ in range(k + more)]
    full.close()
    first = make_loader(seed=1, num_workers=num_workers)
    for _ in range(k):
        next(first)
    state = first.state_dict()
    first.close()
    resumed = make_loader(seed=1, num_workers=num_workers)
    resumed.load_state_dict(state)
    got = [next(resumed) for _ in range(more)]
    assert all(same(r, g) for r, g in zip(ref[k:], got))
    # rewinding a loader that is already running works too
    resumed.load_state_dict({name: k + 1 for name in state})
    assert same(next(resumed), ref[k + 1])
    resumed.close()


def test_deterministic_from_seed_and_independent_of_workers():
    a = [next(make_loader(seed=5)) for _ in range(1)][0]
    loader = make_loader(seed=5)
    b = next(loader)
    c = next(make_loader(seed=6))
    assert same(a, b) and not same(a, c)
    w = make_loader(seed=5, num_workers=2)
    assert same(next(w), b)
    w.close()


def test_load_state_dict_names_sources():
    loader = make_loader()
    with pytest.raises(ValueError, match="same sources"):
        loader.load_state_dict({"c": 1})


def test_eval_loader_is_finite_and_ordered():
    ds = TinyDataset("seg", 5)
    batches = list(eval_loader(ds, "seg", 16, batch_size=2))
    assert [len(b["images"]) for b in batches] == [2, 2, 1]
    assert batches[0]["masks"].shape == (2, 16, 16)
    again = list(eval_loader(ds, "seg", 16, batch_size=2))
    assert torch.equal(batches[0]["images"], again[0]["images"])


def test_seg_point_targets_are_drawn_in_the_workers_and_differ_between_batches():
    """The seg point loss's pixels are drawn in the worker (SegPointTargets), fresh for every batch,
    and their labels are those of the batch's own masks."""
    from xlearner.tasks import SegPointTargets

    kw = dict(seed=3, num_workers=1)
    data = {"s": TinyDataset("seg", 7)}
    tf = {"s": build_transform("seg", 16, train=True, augment=AUG["seg"])}
    loader = MultiSourceLoader(data, {"s": 3}, tf, {"s": "seg"}, target_encoders={"s": SegPointTargets(20, None)}, **kw)
    try:
        grids = []
        for _ in range(3):
            b = next(loader)["s"]
            grid, labels = b["seg_point_grid"], b["seg_point_labels"]
            assert grid.shape == (3, 1, 20, 2) and labels.shape == (3, 1, 20)
            # the grid's pixel centres, back to pixels, give the labels the masks hold there
            x = ((grid[..., 0] + 1) / 2 * 16 - 0.5).round().long()
            y = ((grid[..., 1] + 1) / 2 * 16 - 0.5).round().long()
            assert torch.equal(b["masks"][torch.arange(3)[:, None, None], y, x], labels)
            grids.append(grid)
        assert not torch.equal(grids[0], grids[1])
    finally:
        loader.close()


def test_target_encoders_run_in_the_workers_on_the_padded_det_batch():
    """``target_encoders`` (the stage's FCOS matching) is applied in the worker to the collated batch:
    the batches are those of a loader without it, plus the encoded targets of exactly those boxes."""
    from xlearner.models.heads import FCOS_TARGET_KEYS, DetHead

    encoder = DetHead(32, 3, [8]).target_encoder(32)  # a 4 x 4 grid
    tasks = {"d": "det"}
    kw = dict(seed=3, num_workers=1)
    data = {"d": TinyDataset("det", 7)}
    tf = {"d": build_transform("det", 32, train=True, augment=AUG["det"])}
    with_enc = MultiSourceLoader(data, {"d": 3}, tf, tasks, target_encoders={"d": encoder}, **kw)
    without = MultiSourceLoader(data, {"d": 3}, tf, tasks, **kw)
    try:
        for _ in range(3):
            a, b = next(with_enc)["d"], next(without)["d"]
            assert same({"d": a}, {"d": b})
            assert a["fcos_labels"].shape == (3, 16) and a["fcos_ltrb"].shape == (3, 16, 4)
            expected = encoder(b)
            assert all(torch.equal(a[k], expected[k]) for k in FCOS_TARGET_KEYS)
            assert int((a["fcos_labels"] >= 0).sum()) > 0
    finally:
        with_enc.close()
        without.close()
