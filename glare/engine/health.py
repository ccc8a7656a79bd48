"""Is the method learning? Checks on the teacher's targets that the train loop reports to the user.

A DINO-style term learns only while its teacher's targets are neither uniform (every prototype
equally likely: no signal) nor collapsed (every image on the same prototype: no information).
The model logs both entropies per term as fractions of ln K (``teacher_entropy_<term>``,
``batch_entropy_<term>``); these thresholds turn them into warnings that name the likely fix.
"""

from __future__ import annotations

import math

# Per-image entropy above this fraction of ln K: the targets are as good as uniform.
UNIFORM = 0.95
# Entropy of the batch-mean target below this fraction of ln K: every image picks the same prototypes.
COLLAPSED = 0.1


def target_warnings(metrics: dict[str, float]) -> dict[str, str]:
    """``{"<term>:uniform" | "<term>:collapsed": message}`` for every term whose targets are unhealthy."""
    found: dict[str, str] = {}
    for key, value in metrics.items():
        if not key.startswith("teacher_entropy_"):
            continue
        term = key.removeprefix("teacher_entropy_")
        batch = metrics.get(f"batch_entropy_{term}", float("nan"))
        if value > UNIFORM:
            found[f"{term}:uniform"] = (
                f"L_{term}: the teacher's targets are near-uniform (per-image entropy {value:.2f} ln K), so this "
                "term gives the adapters almost no signal. Likely fix: model.head_init=auto or data (a head "
                "bootstrapped from the data), a lower loss.teacher_temp, or fewer prototypes (out_dim of the head).")
        if batch < COLLAPSED:
            found[f"{term}:collapsed"] = (
                f"L_{term}: the teacher's targets have collapsed (entropy of the batch-mean target {batch:.2f} ln K: "
                "every image picks the same prototypes). Likely fix: a lower optim.lr, a higher "
                "loss.teacher_temp, or a lower loss.center_momentum so the centre follows the teacher faster.")
    return found

# An update that multiplies the trainable weights' norm by more than this has exploded: an AdamW step moves
# each weight by about the lr, so a sane step changes the norm by a small fraction. Such weights are finite
# but useless (1e13 after lr=1e38), and a checkpoint of them is nothing a resume could train from.
EXPLODED = 2.0


def exploded(norm_before: float, norm_after: float) -> bool:
    """Whether one update took the trainable weights' norm from ``norm_before`` to a useless ``norm_after``."""
    return not math.isfinite(norm_after) or norm_after > EXPLODED * max(norm_before, 1e-12)
