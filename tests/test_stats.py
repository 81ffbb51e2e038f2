"""Intervals, packed outcomes and the paired test (contract/stats.py) against independent
computations: scipy's Wilson interval and binomial test, and Newcombe's formula written out."""

from __future__ import annotations

import math
import random

import pytest
from scipy.stats import binomtest

from contract.stats import (
    Paired,
    decode_outcomes,
    encode_outcomes,
    interval,
    mcnemar_exact,
    successes,
    wilson,
)


def test_wilson_matches_the_reference_value_and_scipy() -> None:
    # The reference value in docs/METRICS.md: 80 of 200.
    low, high = wilson(80, 200)
    assert (round(low, 4), round(high, 4)) == (0.3346, 0.4692)
    for k, n in ((0, 10), (10, 10), (1, 3), (80, 200), (412, 1000), (9999, 10000)):
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert wilson(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)
        lo, hi = wilson(k, n)
        assert lo <= k / n <= hi
    assert wilson(0, 10)[0] == 0.0
    assert wilson(10, 10)[1] == 1.0


def test_a_stored_value_gives_back_its_count_and_interval() -> None:
    # Values are stored as the shortest decimal of a float32: the count comes back exactly.
    import numpy as np

    for n in (7, 200, 1000, 10_000, 50_000):
        for k in (0, 1, n // 3, n - 1, n):
            stored = float(str(np.float32(k / n)))
            assert successes(stored, n) == k
            assert interval(stored, n) == wilson(k, n)
    assert interval(0.5, None) is None
    assert interval(0.0, 0) is None


def test_outcomes_round_trip_in_packbits_order() -> None:
    import numpy as np

    rng = random.Random(3)
    for n in (0, 1, 7, 8, 9, 1000):
        flags = [rng.random() < 0.5 for _ in range(n)]
        text = encode_outcomes(flags)
        packed = np.packbits(np.array(flags, dtype=bool)).tobytes()
        assert text == (__import__("base64").b64encode(packed).decode() if n else "")
        bits = decode_outcomes(text, n)
        assert [bool(bits >> (n - 1 - i) & 1) for i in range(n)] == flags
        assert bits.bit_count() == sum(flags)


@pytest.mark.parametrize(("text", "n", "why"), [
    ("oAA=", 8, "2 bytes"), ("oAA=", 17, "2 bytes"), ("!!!!", 8, "base64"),
    ("oAE=", 10, "past the last")])  # 0xA0 0x01: the 16th bit is set, past the 10th example
def test_outcomes_that_do_not_fit_their_count_are_refused(text: str, n: int, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        decode_outcomes(text, n)


def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_pairs() -> None:
    # 5 against 15: 2 * (1 + 20 + 190 + 1140 + 4845 + 15504) / 2**20, by hand.
    assert mcnemar_exact(5, 15) == 2 * 21700 / 2**20 == pytest.approx(0.0413894653)
    assert mcnemar_exact(15, 5) == mcnemar_exact(5, 15)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(7, 7) == 1.0
    for b, c in ((0, 6), (3, 12), (40, 61), (500, 560)):
        assert mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_newcombe_paired_interval_by_hand() -> None:
    """Newcombe (1998) method 10 for A=60 both right, B=5 only the new, C=15 only the
    baseline, D=20 neither (n=100), written out from the paper's formulas with scipy's
    Wilson intervals."""
    a, b, c, d = 60, 5, 15, 20
    n = a + b + c + d
    p1, p2 = (a + b) / n, (a + c) / n
    ci1 = binomtest(a + b, n).proportion_ci(method="wilson")
    ci2 = binomtest(a + c, n).proportion_ci(method="wilson")
    phi = (a * d - b * c - n / 2) / math.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    low = (p1 - p2) - math.sqrt((p1 - ci1.low) ** 2 - 2 * phi * (p1 - ci1.low)
                                * (ci2.high - p2) + (ci2.high - p2) ** 2)
    high = (p1 - p2) + math.sqrt((ci1.high - p1) ** 2 - 2 * phi * (ci1.high - p1)
                                 * (p2 - ci2.low) + (p2 - ci2.low) ** 2)
    paired = Paired(both=a, only_new=b, only_base=c, neither=d)
    assert paired.difference == pytest.approx(-0.10)
    assert paired.interval() == pytest.approx((low, high), abs=1e-12)
    assert paired.interval() == pytest.approx((-0.186557, -0.011963), abs=1e-6)
    assert paired.p_value == pytest.approx(0.0413894653)


def test_paired_counts_from_outcome_bits() -> None:
    new = decode_outcomes(encode_outcomes([1, 1, 0, 0, 1]), 5)
    base = decode_outcomes(encode_outcomes([1, 0, 1, 0, 0]), 5)
    assert Paired.of(new, base, 5) == Paired(both=1, only_new=2, only_base=1, neither=1)
    same = Paired.of(new, new, 5)
    assert same.difference == 0.0
    assert same.p_value == 1.0
    low, high = same.interval()
    assert low < 0 < high


def test_the_supervisor_refuses_an_accuracy_whose_outcomes_say_otherwise() -> None:
    """What comes out of the jail is checked: the outcomes must be ``n`` flags whose share is
    the row's value, or the report breaks the protocol (the job fails ``sandbox-error``)."""
    from workers.sandbox.protocol import ProtocolError, validate

    def entry(**row: object) -> dict[str, object]:
        return {"t": "entry", "index": 0, "seconds": 0.1, "checks": [], "artifacts": {},
                "rows": [{"benchmark": "clean", "metric": "accuracy", "params": {}, **row}]}

    flags = encode_outcomes([1, 1, 0, 1])
    ok = validate(entry(value=0.75, n=4, outcomes=flags)).model_dump()
    assert ok["rows"][0]["n"] == 4
    assert validate(entry(value=0.5)).model_dump()["rows"][0]["n"] is None
    for lie in (dict(value=1.0, n=4, outcomes=flags), dict(value=0.75, n=5, outcomes=flags),
                dict(value=0.75, n=4), dict(value=0.75, outcomes=flags),
                dict(value=0.75, n=4, outcomes="not base64")):
        with pytest.raises(ProtocolError):
            validate(entry(**lie))
