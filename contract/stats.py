"""Uncertainty of accuracies, and the paired comparison of two evaluations on the same examples.

Pure Python (the standard library only), so the API serves intervals without numpy and the
engine, the API and the command-line gate compute them by one definition
(docs/METRICS.md, "Uncertainty"). An accuracy here is a share of successes among ``n``
examples; a row that is such a share carries its per-example outcomes, packed by
:func:`encode_outcomes`.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

CONFIDENCE = 0.95
Z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
"""The standard normal quantile of a two-sided 95% interval, 1.959963984540054."""

_ASCII_BITS = bytes.maketrans(b"\x00\x01", b"01")


def successes(value: float, n: int) -> int:
    """The count of successes behind an accuracy ``value`` over ``n`` examples.

    Values are stored as the shortest decimal of a float32 (docs/ARCHITECTURE.md), whose
    relative error (6e-8) moves ``value * n`` by far less than a half for any ``n`` below
    millions, so rounding recovers the count exactly.
    """
    return max(0, min(n, round(value * n)))


def wilson(k: int, n: int, z: float = Z) -> tuple[float, float]:
    """The Wilson score interval for ``k`` successes in ``n`` trials (Wilson 1927).

    ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`` with ``p = k/n``: it stays inside
    [0, 1], is never empty at p = 0 or 1 (unlike the normal approximation), and its coverage
    is close to nominal for small n (Brown, Cai & DasGupta 2001).
    """
    if n <= 0:
        raise ValueError("an interval needs at least one example")
    if not 0 <= k <= n:
        raise ValueError(f"{k} successes in {n} trials")
    p = k / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    denom = 1 + z2 / n
    low = 0.0 if k == 0 else (centre - half) / denom
    high = 1.0 if k == n else (centre + half) / denom
    return low, high


def interval(value: float, n: int | None) -> tuple[float, float] | None:
    """The 95% Wilson interval of a stored accuracy ``value`` over ``n`` examples; None
    without a count (a row that is not a share of examples) or with no examples."""
    if n is None or n <= 0:
        return None
    return wilson(successes(value, n), n)


def encode_outcomes(flags: bytes | Sequence[bool]) -> str:
    """Per-example outcomes (one 0 or 1 per example, in the data's order) as text.

    Eight examples a byte, the first in the most significant bit (numpy's ``packbits``
    order), the last byte padded with zeros, in base64: 10 000 examples take 1 668
    characters.
    """
    bits = bytes(flags)
    digits = bits.translate(_ASCII_BITS) + b"0" * (-len(bits) % 8)
    if not digits:
        return ""
    try:
        packed = int(digits, 2).to_bytes(len(digits) // 8, "big")
    except ValueError:
        raise ValueError("outcomes must be 0 or 1") from None
    return base64.b64encode(packed).decode("ascii")


def decode_outcomes(text: str, n: int) -> int:
    """The outcomes of :func:`encode_outcomes` as a bit set: bit ``n - 1 - i`` is example
    ``i``. Raises ValueError for text that is not ``n`` packed outcomes."""
    if n < 0:
        raise ValueError("a negative count of examples")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("outcomes are not base64") from None
    if len(raw) != (n + 7) // 8:
        raise ValueError(f"{len(raw)} bytes of outcomes for {n} examples")
    pad = -n % 8
    bits = int.from_bytes(raw, "big")
    if bits & ((1 << pad) - 1):
        raise ValueError("outcomes have bits set past the last example")
    return bits >> pad


def mcnemar_exact(b: int, c: int) -> float:
    """The exact two-sided McNemar p-value for ``b`` and ``c`` discordant pairs.

    Under the null hypothesis that both classifiers are equally accurate, each of the
    ``b + c`` examples exactly one of them gets right is equally likely to be either's, so
    ``min(b, c)`` is Binomial(b + c, 1/2) in its lower tail: p = min(1, 2·P(X <= min(b, c))).
    Computed in integers, exactly, then rounded once.
    """
    if b < 0 or c < 0:
        raise ValueError("negative counts")
    m = b + c
    if m == 0:
        return 1.0
    tail, term = 0, 1  # term = C(m, i)
    for i in range(min(b, c) + 1):
        tail += term
        term = term * (m - i) // (i + 1)
    return min(1.0, 2 * tail / (1 << m))  # 2**m, as an int


@dataclass(frozen=True)
class Paired:
    """Two classifiers on the same ``n`` examples: ``both`` right, ``only_new`` right,
    ``only_base`` right, ``neither`` right."""

    both: int
    only_new: int
    only_base: int
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.only_new + self.only_base + self.neither

    @classmethod
    def of(cls, new: int, base: int, n: int) -> Paired:
        """From two outcome bit sets of :func:`decode_outcomes` over the same ``n`` examples."""
        everyone = (1 << n) - 1
        return cls(both=(new & base).bit_count(), only_new=(new & ~base & everyone).bit_count(),
                   only_base=(base & ~new & everyone).bit_count(),
                   neither=(~(new | base) & everyone).bit_count())

    @property
    def difference(self) -> float:
        """Accuracy of the new one minus the baseline's."""
        return (self.only_new - self.only_base) / self.n

    @property
    def p_value(self) -> float:
        return mcnemar_exact(self.only_new, self.only_base)

    def interval(self, z: float = Z) -> tuple[float, float]:
        """Newcombe's hybrid score interval for a paired difference of proportions (Newcombe
        1998, "Improved confidence intervals for the difference between binomial proportions
        based on paired data", method 10).

        With Wilson intervals (l1, u1) of the new accuracy p1 and (l2, u2) of the baseline's
        p2, and phi the correlation of the two outcomes,
        ``L = d - sqrt((p1 - l1)² - 2·phi·(p1 - l1)(u2 - p2) + (u2 - p2)²)``,
        ``U = d + sqrt((u1 - p1)² - 2·phi·(u1 - p1)(p2 - l2) + (p2 - l2)²)``, d = p1 - p2.
        phi = (A·D - B·C) / sqrt((A+B)(C+D)(A+C)(B+D)) with A both right, B only the new
        one, C only the baseline, D neither; when A·D > B·C its numerator is
        max(A·D - B·C - n/2, 0); phi = 0 when a margin is empty.
        """
        a, b, c, d, n = self.both, self.only_new, self.only_base, self.neither, self.n
        if n <= 0:
            raise ValueError("an interval needs at least one example")
        p1, p2 = (a + b) / n, (a + c) / n
        l1, u1 = wilson(a + b, n, z)
        l2, u2 = wilson(a + c, n, z)
        margins = (a + b) * (c + d) * (a + c) * (b + d)
        num = float(a * d - b * c)
        if num > 0:
            num = max(num - n / 2, 0.0)
        phi = num / math.sqrt(margins) if margins else 0.0
        diff = p1 - p2
        low = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2)
                                   + (u2 - p2) ** 2))
        high = diff + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2)
                                    + (p2 - l2) ** 2))
        return max(-1.0, low), min(1.0, high)
