"""Built-in datasets: determinism, exact masks, exact correlations, coupled redraws, npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from workers.engine.data import (
    BUILTINS,
    BuiltinSource,
    DatasetFormatError,
    load_builtin,
    load_npz,
)


@pytest.mark.slow
def test_same_seed_same_data_other_seed_other_data() -> None:
    a = load_builtin("shapes-32", "test", seed=3, assets="procedural")
    b = load_builtin("shapes-32", "test", seed=3, assets="procedural")
    c = load_builtin("shapes-32", "test", seed=4, assets="procedural")
    assert torch.equal(a.x, b.x)
    assert torch.equal(a.y, b.y)
    assert a.x is not b.x  # fresh tensors per call: a caller's edits cannot leak
    assert not torch.equal(a.x, c.x)


@pytest.mark.slow
def test_generation_does_not_depend_on_cache_or_global_rng() -> None:
    from workers.engine.data import builtin

    first = load_builtin("waterbirds-32", "val", seed=11)
    builtin._arrays.cache_clear()
    np.random.seed(123)  # the generator must ignore the global RNG
    torch.manual_seed(123)
    again = load_builtin("waterbirds-32", "val", seed=11)
    assert torch.equal(first.x, again.x)


@pytest.mark.slow
def test_caller_mutation_does_not_corrupt_cache() -> None:
    a = load_builtin("shapes-32", "test")
    a.x.zero_()
    a.y.zero_()
    b = load_builtin("shapes-32", "test")
    assert b.x.abs().sum() > 0
    assert b.y.max() == 3


@pytest.mark.slow
def test_splits_are_different_images() -> None:
    tr = load_builtin("shapes-32", "train")
    te = load_builtin("shapes-32", "test")
    assert not torch.equal(tr.x[: len(te)], te.x)


@pytest.mark.parametrize(("name", "assets"), [
    ("waterbirds-32", "auto"), ("waterbirds-32", "procedural"), ("scenes-9", "procedural"),
    ("shapes-32", "auto"), ("colored-mnist", None),
])
@pytest.mark.slow
def test_masks_are_exact_and_backgrounds_clean(name: str, assets: str | None) -> None:
    d = load_builtin(name, "test") if assets is None else load_builtin(name, "test",
                                                                        assets=assets)
    assert d.masks is not None
    assert d.backgrounds is not None
    assert set(torch.unique(d.masks).tolist()) == {0.0, 1.0}
    outside = (1 - d.masks).expand_as(d.x).bool()
    assert torch.equal(d.x[outside], d.backgrounds[outside])
    frac = d.masks.mean(dim=(1, 2, 3))
    assert frac.min() > 0.01
    assert frac.max() < 0.7
    # the object is not the background: the mask region differs from the clean background
    inside = d.masks.expand_as(d.x).bool()
    assert (d.x[inside] - d.backgrounds[inside]).abs().mean() > 0.05 or name == "colored-mnist"


@pytest.mark.slow
def test_procedural_and_asset_modes_have_the_same_task_shape() -> None:
    a = load_builtin("waterbirds-32", "test", assets="auto")
    p = load_builtin("waterbirds-32", "test", assets="procedural")
    assert a.x.shape == p.x.shape
    assert a.group_names == p.group_names
    assert torch.equal(a.y, p.y)
    assert torch.equal(a.groups, p.groups)  # type: ignore[arg-type]
    assert isinstance(p.source, BuiltinSource)
    assert dict(p.source.assets) == {"objects": "procedural", "backgrounds": "procedural"}


@pytest.mark.parametrize("corr", [0.95, 0.5, 0.2])
@pytest.mark.slow
def test_train_correlation_is_exact(corr: float) -> None:
    d = load_builtin("waterbirds-32", "train", correlation=corr)
    assert d.groups is not None
    assert d.group_names is not None
    place = d.groups % 2  # group = label * 2 + place, places in family order (land, water)
    match = (place == d.y).float().mean().item()
    assert match == pytest.approx(corr, abs=1 / 1500)


def test_test_split_groups_are_balanced() -> None:
    for name in ("waterbirds-32", "shapes-32"):
        d = load_builtin(name, "test")
        assert d.groups is not None
        assert d.group_names is not None
        counts = torch.bincount(d.groups, minlength=len(d.group_names))
        assert counts.min() == counts.max(), name


@pytest.mark.slow
def test_with_correlation_only_swaps_backgrounds() -> None:
    base = load_builtin("waterbirds-32", "test")
    assert base.source is not None
    kept = base.source.with_correlation(0.95, "test")
    rev = base.source.with_correlation(0.05, "test")
    assert torch.equal(kept.y, base.y)
    assert torch.equal(rev.y, base.y)
    assert torch.equal(kept.masks, base.masks)  # type: ignore[arg-type]
    inside = base.masks.expand_as(base.x).bool()  # type: ignore[union-attr]
    assert torch.equal(kept.x[inside], base.x[inside])  # same objects, same poses
    assert kept.groups is not None
    assert rev.groups is not None
    assert (kept.groups % 2 == kept.y).float().mean() == pytest.approx(0.95)
    assert (rev.groups % 2 == rev.y).float().mean() == pytest.approx(0.05)
    # the train correlation a model saw travels with the source
    assert isinstance(kept.source, BuiltinSource)
    assert kept.source.train_correlation == 0.95


@pytest.mark.slow
def test_colored_mnist_recipe() -> None:
    d = load_builtin("colored-mnist", "train")
    red = d.x[:, 0].sum(dim=(1, 2)) > d.x[:, 1].sum(dim=(1, 2))
    colour = (~red).long()
    assert (colour == d.y).float().mean().item() == pytest.approx(0.9, abs=1e-3)
    assert d.x[:, 2].max() == 0  # blue channel unused
    noisy = load_builtin("colored-mnist", "train", label_noise=0.0)
    flipped = (noisy.y != d.y).float().mean().item()
    assert flipped == pytest.approx(0.25, abs=1e-3)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown built-in"):
        load_builtin("cifar-10", "test")
    with pytest.raises(ValueError, match="split"):
        load_builtin("shapes-32", "holdout")
    with pytest.raises(ValueError, match="label_noise"):
        load_builtin("shapes-32", "test", label_noise=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_builtin("shapes-32", "test", correlation=1.2)


@pytest.mark.slow
def test_every_builtin_has_the_advertised_sizes() -> None:
    for name, spec in BUILTINS.items():
        assert len(load_builtin(name, "val")) == spec.sizes["val"]


# ----------------------------------------------------------------------------------- npz


def _write_npz(path: Path, **override: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "images": rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
        "labels": np.array([0, 1, 0, 1, 2, 2], np.int64),
        "splits": np.array(["train", "test", "test", "train", "test", "train"]),
        "class_names": np.array(["a", "b", "c"]),
        "masks": (rng.random((6, 8, 8)) > 0.5).astype(np.uint8),
        "groups": np.array([0, 1, 1, 0, 0, 1], np.int64),
        "group_names": np.array(["g0", "g1"]),
    }
    arrays.update(override)
    np.savez(path, **arrays)  # type: ignore[arg-type]


def test_load_npz_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "up.npz"
    _write_npz(path)
    d = load_npz(path, "test")
    raw = np.load(path, allow_pickle=False)
    assert len(d) == 3
    assert d.class_names == ["a", "b", "c"]
    assert d.y.tolist() == [1, 0, 2]
    assert torch.equal(d.x[0], torch.from_numpy(raw["images"][1]).permute(2, 0, 1) / 255.0)
    assert d.masks is not None
    assert d.masks.shape == (3, 1, 8, 8)
    assert torch.equal(d.masks[:, 0], torch.from_numpy(raw["masks"][[1, 2, 4]]).float())
    assert d.groups is not None
    assert d.groups.tolist() == [1, 1, 0]
    assert d.group_names == ["g0", "g1"]
    assert d.source is None


def test_load_npz_optional_arrays_absent(tmp_path: Path) -> None:
    path = tmp_path / "plain.npz"
    rng = np.random.default_rng(1)
    np.savez(path, images=rng.integers(0, 256, (2, 4, 4, 1), dtype=np.uint8),
             labels=np.array([0, 1]), splits=np.array(["test", "test"]),
             class_names=np.array(["x", "y"]))
    d = load_npz(path, "test")
    assert d.masks is None
    assert d.groups is None
    assert d.x.shape == (2, 1, 4, 4)


@pytest.mark.parametrize(("override", "message"), [
    ({"labels": np.array([0, 1, 0, 1, 2, 3])}, "labels must index"),
    ({"images": np.zeros((6, 8, 8, 3), np.float32)}, "uint8"),
    ({"masks": np.zeros((6, 4, 4), np.uint8)}, "masks"),
    ({"groups": np.array([0, 1, 1, 0, 0, 5])}, "groups"),
])
def test_load_npz_rejects_malformed(tmp_path: Path, override: dict[str, np.ndarray],
                                    message: str) -> None:
    path = tmp_path / "bad.npz"
    _write_npz(path, **override)
    with pytest.raises(DatasetFormatError, match=message):
        load_npz(path, "test")


def test_load_npz_unknown_split_and_pickles(tmp_path: Path) -> None:
    path = tmp_path / "up.npz"
    _write_npz(path)
    with pytest.raises(DatasetFormatError, match="available"):
        load_npz(path, "val")
    evil = tmp_path / "evil.npz"
    _write_npz(evil, class_names=np.array([{"a": 1}, None, 3], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        load_npz(evil, "test")
