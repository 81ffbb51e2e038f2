"""The evaluator's check of every tensor a model server answers (workers/sandbox/remote.py):
one value that is not finite, wherever it sits, fails it; large finite values do not."""

from __future__ import annotations

import pytest
import torch

from workers.sandbox.remote import finite

BAD = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("threads", [1, 2])
def test_one_value_that_is_not_finite_anywhere_fails_the_check(threads: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for size in [*range(1, 70), 4 * 3 * 32 * 32 + 5, 128 * 3 * 32 * 32]:
            t = torch.rand(size, generator=torch.Generator().manual_seed(size)) * 2 - 1
            assert finite(t)
            positions = range(size) if size < 70 else [0, 1, 7, 8, 15, 16, 31, 32, 63,
                                                       size // 2, size - 2, size - 1]
            for pos in positions:
                for bad in BAD:
                    u = t.clone()
                    u[pos] = bad
                    assert not finite(u), (size, pos, bad)
    finally:
        torch.set_num_threads(before)


def test_the_check_reads_every_shape_and_layout_it_is_given() -> None:
    x = torch.rand(5, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert finite(x)
    x[4, 2, 3, 3] = float("nan")
    assert not finite(x)
    assert finite(torch.empty(0, 10))  # an empty batch has nothing that is not finite
    assert not finite(torch.tensor(float("inf")))
    big = torch.full((3, 4), 3.0e38)
    big[0, 0] = -3.0e38
    assert finite(big)  # the largest float32 values are finite; only their sum is not
