"""``benchmarks/training.py`` runs both loops on the same work and prints one row per method."""

from __future__ import annotations

import json

import pytest

from benchmarks import training

pytestmark = pytest.mark.slow


def test_prints_a_row_per_method_with_both_rates(capsys: pytest.CaptureFixture[str]) -> None:
    assert training.main(["--images", "6", "--batch", "2", "--methods", "standard,fgsm_rs",
                          "--repeats", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [json.loads(line) for line in lines[:-1]]
    assert [r["method"] for r in rows] == ["standard", "fgsm_rs"]
    for r in rows:
        # 3 batches a run, the first a warm-up: 2 timed batches in each of 2 runs
        assert r["batches_timed"] == 4
        assert r["engine_images_per_s"] > 0
        assert r["plain_images_per_s"] > 0
        assert r["engine_over_plain"] == pytest.approx(
            r["engine_images_per_s"] / r["plain_images_per_s"], rel=0.01)
    assert lines[-1].startswith("device cpu")
