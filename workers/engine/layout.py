"""Memory layouts of image batches, pinned exactly.

``Tensor.is_contiguous`` ignores the strides of size-1 dimensions, so for a one-channel
batch the contiguous (NCHW) and channels_last (NHWC) layouts both pass either test, and
``x.contiguous()`` / ``x.contiguous(memory_format=torch.channels_last)`` return ``x`` as it
is. A convolution nevertheless picks its output layout from those strides: a grey batch whose
channel stride is 1 (``permute`` of an HWC array) gives channels_last activations, on which a
model's ``x.view(x.size(0), -1)`` fails. :func:`in_layout` gives a batch the canonical strides
of one layout, copying only when they differ, so every forward of a model sees the layout it
was meant to see, whatever the channel count.
"""

from __future__ import annotations

import torch
from torch import Tensor


def canonical_strides(shape: tuple[int, ...], channels_last: bool) -> tuple[int, ...]:
    """The strides ``torch.empty(shape, memory_format=...)`` gives a 4-d ``shape``."""
    n, c, h, w = shape
    if channels_last:
        return (h * w * c, 1, w * c, c)
    return (c * h * w, h * w, w, 1)


def in_layout(x: Tensor, channels_last: bool = False) -> Tensor:
    """``x`` (any 4-d batch) with exactly the strides of the contiguous layout, or of
    channels_last; ``x`` itself when it has them already. Other ranks: ``x.contiguous()``.
    Differentiable (a copy)."""
    if x.dim() != 4:
        return x.contiguous()
    if tuple(x.stride()) == canonical_strides(tuple(x.shape), channels_last):
        return x
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.clone(memory_format=fmt)
