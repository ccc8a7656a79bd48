"""Step-based schedules (pure functions of the global step, so they survive a change of world size)."""

from __future__ import annotations

import math

from glare.config import GlareConfig


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step ``total`` and after)."""
    if total <= 0 or step >= total:
        return end
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * max(step, 0) / total))


def warmup_cosine(step: int, total: int, peak: float, final: float, warmup: int) -> float:
    """Linear warm-up from 0 to ``peak`` over ``warmup`` steps, then cosine down to ``final``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return cosine(step - warmup, max(total - warmup, 1), peak, final)


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """Linear ramp from ``start`` to ``end`` over ``warmup`` steps, then constant."""
    if warmup <= 0 or step >= warmup:
        return end
    return start + (end - start) * step / warmup


def teacher_temp(cfg: GlareConfig, step: int) -> float:
    """The teacher's softmax temperature at ``step``: a linear warm-up to ``loss.teacher_temp``."""
    lo = cfg.loss
    return linear_warmup(step, lo.teacher_temp_warmup_steps, lo.teacher_temp_start, lo.teacher_temp)


def teacher_momentum(cfg: GlareConfig, step: int) -> float:
    """The teacher's EMA momentum at ``step``: cosine from ``model.momentum_start`` to ``momentum_end``."""
    m = cfg.model
    return cosine(step, cfg.train.steps, m.momentum_start, m.momentum_end)
