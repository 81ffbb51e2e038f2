"""Bad uploads: every bad row named, unsafe archives refused, limits enforced with 413."""

from __future__ import annotations

import bz2
import io
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from service.datasets.ingest import DatasetIngestError, IngestLimits, ingest
from tests.service.ingest_fixtures import npy, png, solid, write_tar, write_zip


def ingest_error(tmp_path: Path, archive: Path, **limits: int) -> DatasetIngestError:
    dest = tmp_path / "out.npz"
    with pytest.raises(DatasetIngestError) as caught:
        ingest(archive, dest, name="bad", limits=IngestLimits(**limits))
    assert not dest.exists()
    assert not list(tmp_path.glob(".out.npz*"))  # no partial file left behind
    return caught.value


def problems(err: DatasetIngestError) -> list[tuple[int, str, str]]:
    return [(r.row, r.path, r.problem) for r in err.rows]


def has_row(err: DatasetIngestError, row: int, path: str, fragment: str) -> bool:
    return any(r == row and p == path and fragment in prob for r, p, prob in problems(err))


def test_every_kind_of_bad_manifest_row_is_named(tmp_path: Path) -> None:
    good = png(solid((1, 2, 3)))
    files = {
        "ok.png": good,
        "a.png": good,
        "broken.png": b"\x89PNG\r\n\x1a\nthis is not really a png",
        "m_small.png": png(np.zeros((4, 4), np.uint8)),
        "m_ok.png": png(np.zeros((8, 8), np.uint8)),
        "classes.txt": b"zero\none\ntwo\n",
    }
    manifest = [
        "path,label,mask,split",  # line 1
        "ok.png,0,m_ok.png,train",  # 2: fine
        "missing.png,1,m_ok.png,train",  # 3: missing image
        "broken.png,1,m_ok.png,train",  # 4: undecodable
        "a.png,one,m_ok.png,train",  # 5: non-integer label
        "a.png,3,m_ok.png,train",  # 6: out of range (3 classes)
        "a.png,-1,m_ok.png,train",  # 7: negative
        "a.png,2,m_small.png,train",  # 8: mask size mismatch
        "../escape.png,0,m_ok.png,train",  # 9: leaves the root
        "/etc/passwd,0,m_ok.png,train",  # 10: absolute
        "a.png,0,,train",  # 11: empty mask
        "a.png,0,nope.png,train",  # 12: missing mask
        "a.png,0,m_ok.png,bad split!",  # 13: bad split name
        "a.png,0",  # 14: short row
    ]
    files["manifest.csv"] = ("\n".join(manifest) + "\n").encode()
    err = ingest_error(tmp_path, write_zip(tmp_path / "bad.zip", files))

    assert err.type == "dataset-bad-row"
    assert err.status == 422
    assert has_row(err, 3, "missing.png", "not in the archive")
    assert has_row(err, 4, "broken.png", "not a decodable PNG or JPEG image")
    assert has_row(err, 5, "a.png", "'one' is not an integer")
    assert has_row(err, 6, "a.png", "out of range 0..2")
    assert has_row(err, 7, "a.png", "negative")
    assert has_row(err, 8, "a.png", "mask is 4x4 but the image is 8x8")
    assert has_row(err, 9, "../escape.png", "leaves the archive root")
    assert has_row(err, 10, "/etc/passwd", "absolute")
    assert has_row(err, 11, "a.png", "mask is empty")
    assert has_row(err, 12, "a.png", "mask file 'nope.png' is not in the archive")
    assert has_row(err, 13, "a.png", "split 'bad split!'")
    assert has_row(err, 14, "a.png", "row has 2 fields")
    assert not any(r == 2 for r, _, _ in problems(err))
    assert err.more_rows == 0
    body = err.problem()
    assert body["status"] == 422
    assert body["type"] == "https://robustscope.dev/problems/dataset-bad-row"
    assert len(body["errors"]) == len(err.rows)
    assert set(body["errors"][0]) == {"row", "path", "problem"}


def test_only_undecodable_images_get_their_own_type(tmp_path: Path) -> None:
    files = {
        "good.png": png(solid((5, 5, 5))),
        "bad.png": b"GIF89a not really",
        "trunc.png": png(solid((5, 5, 5), (32, 32)))[:60],
        "manifest.csv": b"path,label\ngood.png,0\nbad.png,0\ntrunc.png,1\n",
    }
    err = ingest_error(tmp_path, write_zip(tmp_path / "u.zip", files))
    assert err.type == "dataset-image-undecodable"
    assert err.status == 422
    assert [(r, p) for r, p, _ in problems(err)] == [(3, "bad.png"), (4, "trunc.png")]


def test_jsonl_bad_lines_are_named(tmp_path: Path) -> None:
    files = {
        "a.png": png(solid((5, 5, 5))),
        "manifest.jsonl": b'{"path": "a.png", "label": 0}\n{not json\n[1, 2]\n'
        b'{"path": "a.png", "label": true}\n{"path": "a.png", "label": 1.5}\n',
    }
    err = ingest_error(tmp_path, write_zip(tmp_path / "j.zip", files))
    assert has_row(err, 2, "manifest.jsonl", "not valid JSON")
    assert has_row(err, 3, "manifest.jsonl", "not a JSON object")
    assert has_row(err, 4, "a.png", "True is not an integer")
    assert has_row(err, 5, "a.png", "not an integer class index")


def test_many_bad_rows_are_listed_up_to_fifty_and_counted(tmp_path: Path) -> None:
    rows = ["path,label"] + [f"missing_{i}.png,0" for i in range(120)]
    files = {"manifest.csv": "\n".join(rows).encode(), "x.png": png(solid((0, 0, 0)))}
    err = ingest_error(tmp_path, write_zip(tmp_path / "m.zip", files))
    assert len(err.rows) == 50
    assert err.more_rows == 70
    assert err.rows[0].row == 2
    assert "120 bad row(s)" in err.detail


def test_waterbirds_bad_values_are_named(tmp_path: Path) -> None:
    files = {
        "a/1.jpg": png(solid((1, 1, 1))),
        "metadata.csv": b"img_id,img_filename,y,split,place\n1,a/1.jpg,2,0,0\n2,a/1.jpg,0,5,1\n"
        b"3,a/2.jpg,0,0,x\n",
    }
    err = ingest_error(tmp_path, write_zip(tmp_path / "w.zip", files))
    assert has_row(err, 2, "a/1.jpg", "y is '2'")
    assert has_row(err, 3, "a/1.jpg", "split is '5'")
    assert has_row(err, 4, "a/2.jpg", "not in the archive")
    assert has_row(err, 4, "a/2.jpg", "place is 'x'")


def test_imagenet9_missing_mask_and_rival10_unknown_wnid_are_named(tmp_path: Path) -> None:
    files = {
        "original/val/00_dog/a.JPEG": png(solid((1, 1, 1))),
        "original/val/00_dog/b.JPEG": png(solid((1, 1, 1))),
        "fg_mask/val/00_dog/a.npy": npy(np.ones((8, 8), bool)),
    }
    err = ingest_error(tmp_path, write_zip(tmp_path / "i.zip", files))
    assert problems(err) == [
        (2, "original/val/00_dog/b.JPEG", "no foreground mask fg_mask/val/00_dog/b.npy (or .png)")
    ]
    files = {
        "test/ordinary/n02099712_1.JPEG": png(solid((1, 1, 1))),
        "test/ordinary/n09999999_2.JPEG": png(solid((1, 1, 1))),
    }
    err = ingest_error(tmp_path, write_zip(tmp_path / "r.zip", files))
    assert has_row(err, 2, "test/ordinary/n09999999_2.JPEG", "not one of RIVAL10's")


def test_pickled_npy_mask_is_refused_not_loaded(tmp_path: Path) -> None:
    pickled = npy(np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    files = {
        "original/val/00_dog/a.JPEG": png(solid((1, 1, 1))),
        "fg_mask/val/00_dog/a.npy": pickled,
    }
    err = ingest_error(tmp_path, write_zip(tmp_path / "p.zip", files))
    assert has_row(err, 1, "original/val/00_dog/a.JPEG (mask fg_mask/val/00_dog/a.npy)", "objects")


def test_npy_header_claiming_a_huge_array_is_refused_before_allocating(tmp_path: Path) -> None:
    header = npy(np.zeros((2, 2), np.uint8)).replace(b"(2, 2)", b"(9999, 9999)")
    files = {
        "original/val/00_dog/a.JPEG": png(solid((1, 1, 1))),
        "fg_mask/val/00_dog/a.npy": header,
    }
    err = ingest_error(tmp_path, write_zip(tmp_path / "h.zip", files))
    assert "largest side allowed is 1024" in err.rows[0].problem


def test_image_larger_than_max_side_is_a_bad_row(tmp_path: Path) -> None:
    files = {
        "a/small.png": png(solid((1, 1, 1), (16, 16))),
        "a/wide.png": png(solid((1, 1, 1), (4, 40))),
    }
    err = ingest_error(tmp_path, write_zip(tmp_path / "s.zip", files), max_side=32)
    assert has_row(err, 2, "a/wide.png", "is 40x4; the largest side allowed is 32 px")


# -- unsafe archives -------------------------------------------------------------------------


def _zip_with_raw_names(path: Path, names: list[str], mode: int = 0o100644) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, png(solid((1, 1, 1))))
    return path


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("../evil/x.png", "outside the archive"),
        ("a/../../x.png", "outside the archive"),
        ("/abs/x.png", "absolute path"),
        ("C:/win/x.png", "absolute path"),
        ("..\\win\\x.png", "outside the archive"),
    ],
)
def test_zip_slip_and_absolute_members_are_refused(
    tmp_path: Path, name: str, fragment: str
) -> None:
    archive = _zip_with_raw_names(tmp_path / "z.zip", ["cls/ok.png", name])
    err = ingest_error(tmp_path, archive)
    assert err.type == "dataset-unsafe-archive"
    assert err.status == 422
    assert fragment in err.detail


def test_zip_symlink_member_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "l.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cls/ok.png", png(solid((1, 1, 1))))
        link = zipfile.ZipInfo("cls/link.png")
        link.external_attr = 0o120777 << 16
        zf.writestr(link, "/etc/passwd")
    err = ingest_error(tmp_path, archive)
    assert err.type == "dataset-unsafe-archive"
    assert "symbolic link" in err.detail


def test_zip_duplicate_member_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("cls/a.png", png(solid((1, 1, 1))))
        with pytest.warns(UserWarning, match="Duplicate"):
            zf.writestr("cls/a.png", png(solid((2, 2, 2))))
    err = ingest_error(tmp_path, archive)
    assert err.type == "dataset-unsafe-archive"
    assert "more than once" in err.detail


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE])
def test_tar_links_and_devices_are_refused(tmp_path: Path, kind: bytes) -> None:
    archive = tmp_path / "t.tar.gz"
    data = png(solid((1, 1, 1)))
    with tarfile.open(archive, "w:gz") as tf:
        ok = tarfile.TarInfo("cls/ok.png")
        ok.size = len(data)
        tf.addfile(ok, io.BytesIO(data))
        odd = tarfile.TarInfo("cls/odd.png")
        odd.type = kind
        odd.linkname = "/etc/passwd"
        tf.addfile(odd)
    err = ingest_error(tmp_path, archive)
    assert err.type == "dataset-unsafe-archive"
    assert "cls/odd.png" in err.detail


def test_tar_traversal_member_is_refused(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "t.tar", {"cls/a.png": png(solid((1, 1, 1))), "../x.png": b"x"})
    err = ingest_error(tmp_path, archive)
    assert err.type == "dataset-unsafe-archive"


# -- size limits -----------------------------------------------------------------------------


def test_zip_bomb_is_refused_from_declared_sizes_without_inflating(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("cls/bomb.png", "w", force_zip64=True) as fh:
            chunk = bytes(1 << 20)
            for _ in range(96):  # 96 MiB of zeros, ~100 KB compressed
                fh.write(chunk)
    assert archive.stat().st_size < 1_000_000
    started = time.perf_counter()
    err = ingest_error(tmp_path, archive)
    assert time.perf_counter() - started < 1.0
    assert err.type == "dataset-too-large"
    assert err.status == 413
    assert "per member" in err.detail


def test_total_uncompressed_limit_is_enforced_for_tar_gz(tmp_path: Path) -> None:
    files = {f"cls/{i}.bin": bytes(400_000) for i in range(4)}
    err = ingest_error(
        tmp_path, write_tar(tmp_path / "t.tar.gz", files), max_uncompressed_bytes=1_000_000
    )
    assert err.type == "dataset-too-large"
    assert err.status == 413


def test_too_many_images_is_413(tmp_path: Path) -> None:
    files = {f"cls/{i}.png": png(solid((i, i, i))) for i in range(5)}
    err = ingest_error(tmp_path, write_zip(tmp_path / "n.zip", files), max_images=4)
    assert err.type == "dataset-too-large"
    assert err.status == 413
    assert "5 images" in err.detail


def test_archive_bytes_and_class_count_limits(tmp_path: Path) -> None:
    files = {f"c{i}/a.png": png(solid((i, i, i))) for i in range(3)}
    archive = write_zip(tmp_path / "c.zip", files)
    assert ingest_error(tmp_path, archive, max_classes=2).status == 413
    assert ingest_error(tmp_path, archive, max_archive_bytes=100).status == 413


# -- not an archive / no layout --------------------------------------------------------------


def test_random_bytes_are_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "random.zip"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    err = ingest_error(tmp_path, path)
    assert err.type == "dataset-archive-invalid"
    assert err.status == 422
    assert "not a zip, tar or tar.gz" in err.detail


def test_corrupt_zip_and_gzip_are_clear_errors(tmp_path: Path) -> None:
    zip_path = tmp_path / "c.zip"
    zip_path.write_bytes(b"PK\x03\x04" + bytes(200))
    assert ingest_error(tmp_path, zip_path).type == "dataset-archive-invalid"
    gz_path = tmp_path / "c.tar.gz"
    gz_path.write_bytes(b"\x1f\x8b\x08\x00" + bytes(100))
    assert ingest_error(tmp_path, gz_path).type == "dataset-archive-invalid"


def test_bzip2_tar_is_refused_with_a_reason(tmp_path: Path) -> None:
    path = tmp_path / "x.tar.bz2"
    path.write_bytes(bz2.compress(b"anything"))
    err = ingest_error(tmp_path, path)
    assert err.type == "dataset-archive-invalid"
    assert "bzip2" in err.detail


def test_archive_without_a_known_layout_names_the_layouts(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "x.zip", {"notes.txt": b"hi", "data/table.csv": b"a,b\n1,2\n"})
    err = ingest_error(tmp_path, archive)
    assert err.type == "dataset-layout-unknown"
    for layout in ("manifest", "waterbirds", "imagenet9", "rival10", "imagefolder"):
        assert layout in err.detail
    assert "notes.txt" in err.detail


def test_mixed_depth_images_are_not_an_imagefolder(tmp_path: Path) -> None:
    files = {"a/x.png": png(solid((1, 1, 1))), "a/b/y.png": png(solid((1, 1, 1)))}
    err = ingest_error(tmp_path, write_zip(tmp_path / "m.zip", files))
    assert err.type == "dataset-layout-unknown"


def test_manifest_without_label_column_is_a_manifest_error(tmp_path: Path) -> None:
    files = {"a.png": png(solid((1, 1, 1))), "manifest.csv": b"path,class\na.png,0\n"}
    err = ingest_error(tmp_path, write_zip(tmp_path / "m.zip", files))
    assert err.type == "dataset-bad-manifest"
    assert "label" in err.detail


def test_huge_label_without_class_names_is_a_bad_row_not_a_huge_list(tmp_path: Path) -> None:
    files = {
        "a.png": png(solid((1, 1, 1))),
        "manifest.csv": b"path,label\na.png,0\na.png,999999999\n",
    }
    err = ingest_error(tmp_path, write_zip(tmp_path / "m.zip", files), max_classes=10)
    assert problems(err) == [(3, "a.png", "label 999999999 is above the limit of 10 classes")]
