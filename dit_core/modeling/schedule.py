"""The learning-rate schedule of diff training and interpreter training: linear warm-up, then a cosine
decay from 1 to `floor` (as factors of the base learning rate)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, floor: float, cosine: bool = True) -> float:
    """Factor of the base learning rate at `step` of `total`: (step+1)/warmup during warm-up, then
    cosine from 1 down to `floor` at the last step (1 throughout when `cosine` is false)."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
