"""Each accepted layout, built as a tiny archive in its exact shape, ingested, checked exactly."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.datasets.ingest import DatasetInfo, IngestLimits, ingest
from tests.service.ingest_fixtures import (
    jpeg,
    npy,
    png,
    solid,
    square_mask,
    with_foreground,
    write_tar,
    write_zip,
)

LIMITS = IngestLimits()


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def run(tmp_path: Path, archive: Path, **limits: Any) -> tuple[DatasetInfo, dict[str, np.ndarray]]:
    dest = tmp_path / "out" / "dataset.npz"
    info = ingest(archive, dest, name="fixture", limits=IngestLimits(**limits))
    json.dumps(info.as_dict())  # the API stores and returns it as JSON
    return info, load(dest)


def colour(i: int) -> tuple[int, int, int]:
    return (10 + 20 * i, 200 - 15 * i, (37 * i) % 256)


# -- manifest --------------------------------------------------------------------------------


def test_manifest_csv_with_masks_groups_splits_and_class_names(tmp_path: Path) -> None:
    size = (8, 8)
    files: dict[str, bytes] = {}
    rows = ["path,label,mask,group,split"]
    masks = [square_mask(size, i % 4, (2 * i) % 4, 3) for i in range(5)]
    meta = [(0, "a", "train"), (2, "b", "train"), (1, "a", "test"), (2, "b", "val"), (0, "b", "")]
    for i, (label, group, split) in enumerate(meta):
        files[f"img/{i}.png"] = png(with_foreground(masks[i], fg=colour(i), bg=(0, 0, 0)))
        files[f"masks/{i}.png"] = png((masks[i] * 255).astype(np.uint8))
        rows.append(f"img/{i}.png,{label},masks/{i}.png,{group},{split}")
    files["manifest.csv"] = ("\n".join(rows) + "\n").encode()
    files["classes.txt"] = b"cat\ndog\nbird\n"
    info, arr = run(tmp_path, write_zip(tmp_path / "m.zip", files))

    assert info.layout == "manifest"
    assert info.num_examples == 5
    assert info.num_classes == 3
    assert info.class_names == ["cat", "dog", "bird"]
    assert info.input_shape == [3, 8, 8]
    assert info.splits == {"test": 2, "train": 2, "val": 1}  # empty split -> test
    assert info.has_masks
    assert info.has_groups
    assert info.group_names == ["a", "b"]
    assert arr["images"].dtype == np.uint8
    assert arr["images"].shape == (5, 8, 8, 3)
    assert arr["labels"].dtype == np.int64
    assert arr["labels"].tolist() == [0, 2, 1, 2, 0]
    assert arr["splits"].tolist() == ["train", "train", "test", "val", "test"]
    assert arr["groups"].tolist() == [0, 1, 0, 1, 1]
    assert arr["group_names"].tolist() == ["a", "b"]
    assert arr["class_names"].tolist() == ["cat", "dog", "bird"]
    assert arr["masks"].dtype == np.uint8
    assert arr["masks"].shape == (5, 8, 8)
    for i in range(5):
        assert np.array_equal(arr["masks"][i], masks[i])
        fg = arr["masks"][i].astype(bool)
        assert (arr["images"][i][fg] == colour(i)).all()
        assert (arr["images"][i][~fg] == 0).all()


def test_manifest_jsonl_in_a_top_folder_defaults(tmp_path: Path) -> None:
    lines = []
    files: dict[str, bytes] = {}
    for i, label in enumerate([3, 1, 3, 0]):
        files[f"mydata/x/{i}.png"] = png(solid(colour(i)))
        lines.append(json.dumps({"path": f"x/{i}.png", "label": label}))
    files["mydata/manifest.jsonl"] = ("\n".join(lines) + "\n\n").encode()
    info, arr = run(tmp_path, write_tar(tmp_path / "m.tar.gz", files))

    assert info.layout == "manifest"
    assert info.class_names == ["0", "1", "2", "3"]
    assert info.splits == {"test": 4}
    assert not info.has_masks
    assert not info.has_groups
    assert set(arr) == {"images", "labels", "splits", "class_names"}
    assert arr["labels"].tolist() == [3, 1, 3, 0]
    assert [tuple(arr["images"][i, 0, 0]) for i in range(4)] == [colour(i) for i in range(4)]
    assert any("class(es) have no examples: 2" in w for w in info.warnings)


def test_mixed_sizes_resize_to_most_common_and_masks_stay_aligned(tmp_path: Path) -> None:
    files: dict[str, bytes] = {}
    rows = ["path,label,mask"]
    for i in range(3):
        files[f"{i}.png"] = png(solid(colour(i), (6, 10)))
        files[f"{i}_m.png"] = png(np.zeros((6, 10), np.uint8))
        rows.append(f"{i}.png,0,{i}_m.png")
    big = square_mask((12, 20), 0, 0, 12)  # left 12 columns foreground
    files["big.png"] = png(with_foreground(big, fg=(255, 0, 0), bg=(0, 0, 255)))
    files["big_m.png"] = png(big * 255)
    rows.append("big.png,0,big_m.png")
    files["manifest.csv"] = "\n".join(rows).encode()
    info, arr = run(tmp_path, write_zip(tmp_path / "m.zip", files))

    assert info.input_shape == [3, 6, 10]
    assert any("1 image(s) were resized to 10x6" in w for w in info.warnings)
    mask = arr["masks"][3]
    assert set(np.unique(mask).tolist()) == {0, 1}
    assert mask[:, :6].all()
    assert not mask[:, 6:].any()
    red = arr["images"][3][mask.astype(bool)]
    assert (red[:, 0] > 200).all()
    assert (red[:, 2] < 60).all()


def test_target_size_downscales_but_never_enlarges(tmp_path: Path) -> None:
    files = {f"{i}.png": png(solid(colour(i), (64, 48))) for i in range(2)}
    files["manifest.csv"] = b"path,label\n0.png,0\n1.png,1\n"
    archive = write_zip(tmp_path / "m.zip", files)
    info, arr = run(tmp_path, archive, target_size=32)
    assert info.input_shape == [3, 32, 24]
    assert arr["images"].shape == (2, 32, 24, 3)
    assert tuple(arr["images"][1, 5, 5]) == colour(1)
    info, _ = run(tmp_path, archive, target_size=224)
    assert info.input_shape == [3, 64, 48]


def test_checksums_are_stable_and_content_hash_ignores_packing(tmp_path: Path) -> None:
    files = {f"c{i % 2}/{i}.png": png(solid(colour(i))) for i in range(4)}
    zipped = write_zip(tmp_path / "a.zip", files)
    first, arr1 = run(tmp_path, zipped)
    second, arr2 = run(tmp_path, zipped)
    assert first.sha256 == second.sha256
    assert len(first.sha256) == 64
    assert first.content_sha256 == second.content_sha256
    assert all(np.array_equal(arr1[k], arr2[k]) for k in arr1)
    tarred, _ = run(tmp_path, write_tar(tmp_path / "a.tar", files, gz=False))
    assert tarred.sha256 != first.sha256
    assert tarred.content_sha256 == first.content_sha256
    files["c1/extra.png"] = png(solid((1, 2, 3)))
    changed, _ = run(tmp_path, write_zip(tmp_path / "b.zip", files))
    assert changed.content_sha256 != first.content_sha256


# -- ImageFolder -----------------------------------------------------------------------------


def test_imagefolder_with_split_folders_uses_sorted_class_names(tmp_path: Path) -> None:
    files: dict[str, bytes] = {}
    layout = [("train", "cat", 2), ("train", "Dog", 1), ("train", "ant", 1), ("val", "cat", 1)]
    i = 0
    for split, cls, n in layout:
        for _ in range(n):
            files[f"root/{split}/{cls}/{i:03d}.jpg"] = jpeg(solid(colour(i)))
            i += 1
    files["root/README.txt"] = b"not an image"
    info, arr = run(tmp_path, write_tar(tmp_path / "f.tar", files, gz=False))

    assert info.layout == "imagefolder"
    assert info.class_names == ["Dog", "ant", "cat"]  # torchvision's sorted(), case-sensitive
    assert info.splits == {"train": 4, "val": 1}
    by_path = sorted(p for p in files if p.endswith(".jpg"))
    expected = {"Dog": 0, "ant": 1, "cat": 2}
    assert arr["labels"].tolist() == [expected[p.split("/")[2]] for p in by_path]
    assert any("split val has no images of Dog, ant" in w for w in info.warnings)
    # JPEG is lossy; the colour must still be recognisably the one written.
    first = by_path.index("root/train/cat/000.jpg")
    assert np.abs(arr["images"][first].astype(int) - colour(0)).max() <= 6


def test_imagefolder_without_splits_defaults_to_test(tmp_path: Path) -> None:
    files = {f"b/{i}.png": png(solid(colour(i))) for i in range(2)}
    files |= {f"a/{i}.png": png(solid(colour(i))) for i in range(3)}
    info, arr = run(tmp_path, write_zip(tmp_path / "f.zip", files))
    assert info.class_names == ["a", "b"]
    assert info.splits == {"test": 5}
    assert arr["labels"].tolist() == [0, 0, 0, 1, 1]


def test_ordinary_class_without_wordnet_names_is_imagefolder_not_rival10(tmp_path: Path) -> None:
    files = {
        "train/ordinary/x.png": png(solid(colour(0))),
        "train/special/y.png": png(solid(colour(1))),
        "test/ordinary/z.png": png(solid(colour(2))),
    }
    info, arr = run(tmp_path, write_zip(tmp_path / "f.zip", files))
    assert info.layout == "imagefolder"
    assert info.class_names == ["ordinary", "special"]
    assert arr["splits"].tolist() == ["test", "train", "train"]


def test_manifest_wins_over_folder_structure(tmp_path: Path) -> None:
    files = {f"cls{i}/{i}.png": png(solid(colour(i))) for i in range(3)}
    files["manifest.csv"] = b"path,label\ncls0/0.png,1\ncls2/2.png,0\n"
    info, arr = run(tmp_path, write_zip(tmp_path / "f.zip", files))
    assert info.layout == "manifest"
    assert arr["labels"].tolist() == [1, 0]


# -- ImageNet-9 ------------------------------------------------------------------------------


def test_imagenet9_original_with_npy_and_png_masks(tmp_path: Path) -> None:
    size = (10, 10)
    files: dict[str, bytes] = {}
    specs = [
        ("00_dog", "n01_1", ".npy"),
        ("00_dog", "n01_2", ".png"),
        ("02_wheeled vehicle", "n3", ".npy"),
    ]
    masks = {}
    for i, (cls, stem, kind) in enumerate(specs):
        m = square_mask(size, i, i + 1, 4)
        masks[stem] = m
        files[f"bg_challenge/original/val/{cls}/{stem}.JPEG"] = png(
            with_foreground(m, fg=colour(i), bg=(255, 255, 255))
        )
        if kind == ".npy":
            # The release stores masks as arrays; bool here, so "> 0" is what selects them.
            files[f"bg_challenge/fg_mask/val/{cls}/{stem}.npy"] = npy(m.astype(bool))
        else:
            files[f"bg_challenge/fg_mask/val/{cls}/{stem}.png"] = png(m * 255)
        for variant in ("only_fg", "mixed_rand", "no_fg"):
            files[f"bg_challenge/{variant}/val/{cls}/{stem}.JPEG"] = png(solid((9, 9, 9), size))
    info, arr = run(tmp_path, write_tar(tmp_path / "in9.tar.gz", files))

    assert info.layout == "imagenet9"
    assert info.num_classes == 9
    assert info.class_names[0] == "dog"
    assert info.class_names[2] == "wheeled vehicle"
    assert info.class_names[8] == "fish"
    assert info.splits == {"test": 3}
    assert info.has_masks
    assert arr["labels"].tolist() == [0, 0, 2]
    assert any("mixed_rand, no_fg, only_fg" in w for w in info.warnings)
    for i, (_, stem, _) in enumerate(specs):
        assert np.array_equal(arr["masks"][i], masks[stem])
        fg = arr["masks"][i].astype(bool)
        assert (arr["images"][i][fg] == colour(i)).all()
        assert (arr["images"][i][~fg] == 255).all()


def test_imagenet9_without_fg_mask_has_no_masks(tmp_path: Path) -> None:
    files = {
        "original/val/01_bird/a.JPEG": jpeg(solid(colour(0))),
        "original/val/08_fish/b.JPEG": jpeg(solid(colour(1))),
    }
    info, arr = run(tmp_path, write_zip(tmp_path / "in9.zip", files))
    assert info.layout == "imagenet9"
    assert not info.has_masks
    assert "masks" not in arr
    assert arr["labels"].tolist() == [1, 8]
    assert any("no fg_mask/" in w for w in info.warnings)


# -- Waterbirds ------------------------------------------------------------------------------


def test_waterbirds_metadata_groups_and_splits(tmp_path: Path) -> None:
    root = "waterbird_complete95_forest2water2"
    rows = ["img_id,img_filename,y,split,place,place_filename"]
    spec = [(0, 0, 0), (0, 1, 1), (1, 0, 2), (1, 1, 0), (1, 1, 2)]  # (y, place, split)
    files: dict[str, bytes] = {}
    for i, (y, place, split) in enumerate(spec):
        name = f"{i:03d}.Some_Bird/Some_Bird_{i:04d}.jpg"
        files[f"{root}/{name}"] = png(solid(colour(i)))
        rows.append(f"{i + 1},{name},{y},{split},{place},/x/y.jpg")
    files[f"{root}/metadata.csv"] = ("\n".join(rows) + "\n").encode()
    info, arr = run(tmp_path, write_zip(tmp_path / "wb.zip", files))

    assert info.layout == "waterbirds"
    assert info.class_names == ["landbird", "waterbird"]
    assert info.group_names == [
        "landbird_on_land",
        "landbird_on_water",
        "waterbird_on_land",
        "waterbird_on_water",
    ]
    assert info.has_groups
    assert not info.has_masks
    assert arr["labels"].tolist() == [0, 0, 1, 1, 1]
    assert arr["groups"].tolist() == [0, 1, 2, 3, 3]
    assert arr["splits"].tolist() == ["train", "val", "test", "train", "test"]
    assert info.splits == {"test": 2, "train": 2, "val": 1}
    assert [tuple(arr["images"][i, 0, 0]) for i in range(5)] == [colour(i) for i in range(5)]


# -- RIVAL10 ---------------------------------------------------------------------------------


def _rival10_files(with_masks: bool) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    size = (16, 16)
    # (split, wnid, expected label): Labrador -> dog 5, airliner -> plane 2, zebra -> equine 6.
    spec = [("train", "n02099712", 5), ("train", "n02690373", 2), ("test", "n02391049", 6)]
    files: dict[str, bytes] = {}
    masks: dict[str, np.ndarray] = {}
    for i, (split, wnid, _) in enumerate(spec):
        stem = f"{wnid}_{100 + i}"
        m = square_mask(size, 2, 3 + i, 8)
        masks[stem] = m
        base = f"RIVAL10/{split}/ordinary/{stem}"
        files[f"{base}.JPEG"] = png(with_foreground(m, fg=colour(i), bg=(0, 0, 0)))
        files[f"{base}_attr_labels.npy"] = npy(np.zeros((2, 18), dtype=np.int64))
        files[f"{base}_merged_mask.JPEG"] = jpeg(np.zeros((*size, 3), np.uint8))
        files[f"{base}_attr_dict.pkl"] = pickle.dumps({"entire-object": "..."})
        if with_masks:
            mask_name = f"RIVAL10/{split}/entire_object_masks/{wnid}_{stem}.JPEG"
            files[mask_name] = jpeg(np.repeat((m * 255)[:, :, None], 3, axis=2), quality=90)
    return files, masks


def test_rival10_with_entire_object_masks_never_unpickles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("ingest must never unpickle")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    files, masks = _rival10_files(with_masks=True)
    info, arr = run(tmp_path, write_zip(tmp_path / "rival10.zip", files))

    assert info.layout == "rival10"
    assert info.class_names == [
        "truck", "car", "plane", "ship", "cat", "dog", "equine", "deer", "frog", "bird",
    ]  # fmt: skip
    assert info.has_masks
    assert info.splits == {"test": 1, "train": 2}
    assert arr["labels"].tolist() == [6, 5, 2]  # test/ sorts before train/
    stems = ["n02391049_102", "n02099712_100", "n02690373_101"]
    for i, stem in enumerate(stems):
        assert np.array_equal(arr["masks"][i], masks[stem])  # JPEG mask thresholded at 128
    assert any("_attr_labels.npy" in w for w in info.warnings)


def test_rival10_without_mask_folder_warns_and_has_no_masks(tmp_path: Path) -> None:
    files, _ = _rival10_files(with_masks=False)
    info, arr = run(tmp_path, write_tar(tmp_path / "rival10.tar.gz", files))
    assert info.layout == "rival10"
    assert not info.has_masks
    assert "masks" not in arr
    assert any("entire_object_masks" in w and "never" in w for w in info.warnings)


def test_rival10_labels_from_archive_mapping_files(tmp_path: Path) -> None:
    files, _ = _rival10_files(with_masks=False)
    files["RIVAL10/meta/wnid_to_class.json"] = json.dumps(
        {"n02099712": "Labrador retriever", "n02690373": "airliner", "n02391049": "zebra"}
    ).encode()
    # A deliberately different mapping proves the archive's copy is the one used.
    files["RIVAL10/meta/label_mappings.json"] = json.dumps(
        {"Labrador retriever": ["dog", 1], "airliner": ["plane", 1], "zebra": ["equine", 0]}
    ).encode()
    info, arr = run(tmp_path, write_zip(tmp_path / "r.zip", files))
    assert arr["labels"].tolist() == [0, 1, 1]
    assert any("label_mappings.json" in w for w in info.warnings)


def test_manifest_optional_columns_empty_everywhere_are_ignored(tmp_path: Path) -> None:
    files = {
        "a.png": png(solid(colour(0))),
        "b.png": png(solid(colour(1))),
        "manifest.csv": b"path,label,mask,group,split,note\na.png,1,,,train,x\nb.png,0,,,,y\n",
    }
    info, arr = run(tmp_path, write_zip(tmp_path / "m.zip", files))
    assert not info.has_masks
    assert not info.has_groups
    assert set(arr) == {"images", "labels", "splits", "class_names"}
    assert arr["splits"].tolist() == ["train", "test"]
    assert any("mask column is empty everywhere" in w for w in info.warnings)
    assert any("ignored column(s) note" in w for w in info.warnings)


def test_many_files_across_decode_batches_land_in_their_own_slots(tmp_path: Path) -> None:
    count = 200  # more than three decoding batches
    files = {
        f"c{i % 3}/{i:04d}.png": png(solid((i % 256, i // 256, 7), (4, 4))) for i in range(count)
    }
    archive = write_tar(tmp_path / "many.tar.gz", files)
    info, arr = run(tmp_path, archive, decode_threads=4)
    order = sorted(files)
    for slot, path in enumerate(order):
        i = int(path.split("/")[1][:4])
        assert tuple(arr["images"][slot, 0, 0]) == (i % 256, i // 256, 7)
        assert arr["labels"][slot] == i % 3
    serial, _ = run(tmp_path, archive, decode_threads=1)
    assert serial.content_sha256 == info.content_sha256
