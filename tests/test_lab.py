from collections import Counter
from itertools import islice

import numpy as np
import pytest

from guard_train.lab import photos
from guard_train.lab.dataset import LabConfig, build_lab, pretrain_stream


def test_deterministic_and_seed_sensitive():
    a, b = build_lab(LabConfig(num_instances=20, held_out=4)), build_lab(LabConfig(num_instances=20, held_out=4))
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
    assert [i.caption for i in a.items] == [i.caption for i in b.items]
    c = build_lab(LabConfig(num_instances=20, held_out=4, seed=1))
    assert not all(np.array_equal(x, y) for x, y in zip(a.images, c.images))


def test_manifest_counts_and_copies():
    cfg = LabConfig(num_instances=32, dup_fraction=0.25, dup_repeats=6, near_copy_fraction=0.4, held_out=8)
    lab = build_lab(cfg)
    dup_inst = {it.instance for it in lab.items if it.is_dup}
    assert len(dup_inst) == 8
    assert len(lab.items) == 32 + 8 * 5
    sizes = Counter(it.instance for it in lab.items)
    assert all(sizes[i] == (6 if i in dup_inst else 1) for i in range(32))
    kinds = Counter(it.copy_kind for it in lab.items if it.instance == min(dup_inst))
    assert kinds == {"original": 1, "near": 2, "exact": 3}
    orig = lab.originals
    for it, im in zip(lab.items, lab.images):
        if it.copy_kind == "exact":
            assert np.array_equal(im, orig[it.instance])
        if it.copy_kind == "near":
            assert not np.array_equal(im, orig[it.instance])  # how close it stays: test_copy_calibration
    caps = {it.instance: it.caption for it in lab.items if it.copy_kind == "original"}
    assert len(set(caps.values())) == 32  # captions distinct across instances
    assert all(h.caption not in caps.values() for h in lab.held_out)


def test_dup_image_rephrases_caption_same_attributes():
    lab = build_lab(LabConfig(num_instances=16, dup_fraction=0.25, dup_repeats=4, dup_image_fraction=1.0, held_out=0))
    for inst in {it.instance for it in lab.items if it.is_dup}:
        rows = [it for it in lab.items if it.instance == inst]
        assert all(r.caption_mode == "dup_image" for r in rows)
        assert len({r.caption for r in rows}) == 4
        assert len({str(r.attributes) for r in rows}) == 1


def test_pretrain_and_lab_cells_are_disjoint():
    def rect(c):
        return (c.photo, c.y, c.x, c.y + c.size, c.x + c.size)

    lab, pre = set(map(rect, photos.cells("lab"))), set(map(rect, photos.cells("pretrain")))
    assert lab and pre and not lab & pre
    for a in photos.cells("lab"):
        for b in photos.cells("pretrain"):
            if a.photo == b.photo:  # non-overlapping squares on one grid
                assert a.y + a.size <= b.y or b.y + b.size <= a.y or a.x + a.size <= b.x or b.x + b.size <= a.x


def test_cell_split_cuts_lab_cells_into_disjoint_sub_cells():
    whole, sub = photos.cells("lab"), photos.cells("lab", 2)
    assert len(sub) == 4 * len(whole)
    for k, c in enumerate(whole):  # the 4 sub-cells of cell k tile its top-left 2s x 2s square, inside the cell
        quad = sub[4 * k : 4 * k + 4]
        s = c.size // 2
        assert {(q.photo, q.y, q.x, q.size) for q in quad} == {
            (c.photo, c.y + i * s, c.x + j * s, s) for i in (0, 1) for j in (0, 1)
        }
    lab = build_lab(LabConfig(num_instances=150, held_out=10, dup_fraction=0.04, dup_repeats=4, cell_split=2))
    cells = [tuple(it.cell) + (it.photo,) for it in lab.items if it.copy_kind == "original"]
    cells += [tuple(it.cell) + (it.photo,) for it in lab.held_out]
    assert len(cells) == 160 and len(set(cells)) == 160  # more instances than cells, one sub-cell each
    assert sum(it.is_dup for it in lab.items) == 6 * 4
    # the default (cell_split=1) is the lab every committed model was trained on
    a, b = (build_lab(LabConfig(num_instances=8, held_out=2)),
            build_lab(LabConfig(num_instances=8, held_out=2, cell_split=1)))
    assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))


def test_pretrain_stream_resumes():
    full = list(islice(pretrain_stream(3), 10))
    tail = list(islice(pretrain_stream(3, start=6), 4))
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(full[6:], tail))


def test_validation():
    with pytest.raises(ValueError, match="num_instances"):
        LabConfig(num_instances=10_000).validate()
    with pytest.raises(ValueError, match="cell_split"):
        LabConfig(num_instances=200, held_out=0).validate()  # 109 cells: the message points at lab.cell_split
    LabConfig(num_instances=200, held_out=0, cell_split=2).validate()
    with pytest.raises(ValueError, match="cell_split must be >= 1"):
        LabConfig(cell_split=0).validate()
