import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from guard_train.data import loaders
from guard_train.lab.dataset import LabConfig, build_lab, write_imagefolder, write_parquet

TF = loaders.image_transform(64, center_crop=True, random_flip=False)


@pytest.fixture(scope="module")
def lab():
    return build_lab(LabConfig(num_instances=12, dup_fraction=0.25, dup_repeats=3, held_out=0))


def _expected(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img.copy()).permute(2, 0, 1).float().div(127.5).sub(1)


def _check_roundtrip(ds, lab):
    assert len(ds) == len(lab.items)
    for i in (0, len(ds) - 1):
        row = ds[i]
        it = lab.items[row["id"]]
        assert row["caption"] == it.caption
        assert torch.equal(row["pixel_values"], _expected(lab.images[it.id]))


def test_imagefolder_roundtrip(tmp_path, lab):
    write_imagefolder(lab, tmp_path)
    ds = loaders.build_dataset("imagefolder", str(tmp_path), "image", "text", "id", TF)
    _check_roundtrip(ds, lab)


def test_parquet_roundtrip_embeds_bytes(tmp_path, lab):
    p = write_parquet(lab, tmp_path / "laion" / "train.parquet")
    ds = loaders.build_dataset("parquet", str(p), "image", "text", "id", TF)
    _check_roundtrip(ds, lab)


def test_hf_disk_roundtrip(tmp_path, lab):
    import datasets

    write_imagefolder(lab, tmp_path / "f")
    datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "f"), split="train").save_to_disk(str(tmp_path / "d"))
    _check_roundtrip(loaders.build_dataset("hf_disk", str(tmp_path / "d"), "image", "text", "id", TF), lab)


def _png(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG")
    return b.getvalue()


def test_img2dataset_folder_and_webdataset(tmp_path, lab):
    root = tmp_path / "i2d" / "00000"
    root.mkdir(parents=True)
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for it, im in zip(lab.items, lab.images):
            key = f"{it.id:09d}"
            (root / f"{key}.jpg").write_bytes(_png(im))  # PNG bytes under .jpg still decode (PIL sniffs)
            (root / f"{key}.txt").write_text(it.caption)
            (root / f"{key}.json").write_text(json.dumps({"key": key, "status": "success"}))
            for ext, data in (("png", _png(im)), ("txt", it.caption.encode())):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    ds = loaders.build_dataset("img2dataset", str(tmp_path / "i2d"), "image", "text", "", TF)
    assert len(ds) == len(lab.items)
    r = ds[3]
    assert r["caption"] == lab.items[3].caption and torch.equal(r["pixel_values"], _expected(lab.images[3]))
    wds = loaders.build_dataset("webdataset", str(tmp_path / "*.tar"), "image", "text", "", TF)
    r = wds[3]
    assert r["caption"] == lab.items[3].caption and torch.equal(r["pixel_values"], _expected(lab.images[3]))


def _broken_cases(tmp_path):
    ok = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    buf = _png(ok)
    cmyk = io.BytesIO()
    Image.fromarray(ok).convert("CMYK").save(cmyk, format="JPEG")
    rgba = io.BytesIO()
    Image.fromarray(ok).convert("RGBA").save(rgba, format="PNG")
    gray = io.BytesIO()
    Image.fromarray(ok[..., 0]).save(gray, format="PNG")
    g16 = io.BytesIO()
    Image.fromarray((ok[..., 0].astype(np.uint16) * 257)).save(g16, format="PNG")
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, format="PNG")
    return {
        # name: (image value, caption, should decode)
        "ok": (buf, "a caption", True),
        "cmyk": (cmyk.getvalue(), "c", True),
        "rgba": (rgba.getvalue(), "c", True),
        "gray": (gray.getvalue(), "c", True),
        "gray16": (g16.getvalue(), "c", True),
        "zero_byte": (b"", "c", False),
        "truncated": (buf[: len(buf) // 2], "c", False),
        "not_image": (b"hello, I am text", "c", False),
        "bomb": (bomb.getvalue(), "c", False),
        "missing_file": ({"bytes": None, "path": "nope.png"}, "c", False),
        "missing_caption": (buf, None, False),
        "non_utf8_caption": (buf, b"\xff\xfe\xfa", False),
        "escape": ({"bytes": None, "path": "../../etc/passwd"}, "c", False),
    }


def test_broken_images_are_skipped_counted_listed(tmp_path):
    cases = _broken_cases(tmp_path)
    names = list(cases)
    recs = [loaders.Record(i, cases[n][1], cases[n][0], root=tmp_path) for i, n in enumerate(names)]
    ds = loaders.ImageCaptionDataset(len(recs), lambda i: recs[i], TF)
    batch = loaders.collate([ds[i] for i in range(len(ds))])
    good = {names[i] for i in batch["ids"].tolist()}
    assert good == {n for n, c in cases.items() if c[2]}
    bad = dict(batch["bad"])
    assert {names[i] for i in bad} == {n for n, c in cases.items() if not c[2]}
    assert "zero-byte" in bad[names.index("zero_byte")]
    assert "escapes the dataset root" in bad[names.index("escape")]
    assert "exceeds" in bad[names.index("bomb")] or "DecompressionBomb" in bad[names.index("bomb")]
    assert batch["pixel_values"].shape == (len(good), 3, 64, 64)
    assert batch["pixel_values"].abs().max() <= 1.0
    loaders.write_bad_items(batch["bad"], tmp_path / "bad.json")
    assert len(json.loads((tmp_path / "bad.json").read_text())) == len(bad)


def test_missing_columns_and_paths_have_clear_errors(tmp_path, lab):
    write_imagefolder(lab, tmp_path)
    with pytest.raises(loaders.DataError, match=r"caption column 'caption' not found.*Set data.caption_column"):
        loaders.build_dataset("imagefolder", str(tmp_path), "image", "caption", "", TF)
    with pytest.raises(loaders.DataError, match="no parquet files"):
        loaders.build_dataset("parquet", str(tmp_path / "none.parquet*"), "image", "text", "", TF)


def test_streaming_parquet_shards_and_resumes(tmp_path, lab):
    p = write_parquet(lab, tmp_path / "s" / "train.parquet")
    shards = []
    for rank in (0, 1):
        ds = loaders.StreamingImageCaptionDataset("parquet", str(p), "image", "text", "id", TF, seed=0, rank=rank,
                                                  world=2)
        ds.set_epoch(0)
        shards.append([r["id"] for r in ds])
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(len(lab.items)))
    ds = loaders.StreamingImageCaptionDataset("parquet", str(p), "image", "text", "id", TF, seed=0, rank=0, world=2)
    ds.set_epoch(0)
    ds.start_at(3)
    assert [r["id"] for r in ds] == shards[0][3:]
    ds.set_epoch(1)
    assert [r["id"] for r in ds] != shards[0]  # reshuffled per epoch
    row = next(iter(ds))
    assert torch.equal(row["pixel_values"], _expected(lab.images[row["id"]]))
