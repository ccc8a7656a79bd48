"""GLARE's four consistency terms: DINO-style cross-entropies of student and teacher logits.

The model runs the heads and passes logits in. ``L_glob`` (:class:`GlobalLoss`) pairs each view's
student with the other view's teacher; ``L_reg``, ``L_loc1`` and ``L_loc2`` each compare matching
rows (regions, distorted patches, patches inside the other view) with a
:class:`CenteredCrossEntropy` of their own, so each term keeps its own centre.
"""

from glare.losses.centered_ce import CenteredCrossEntropy
from glare.losses.global_loss import GlobalLoss

__all__ = ["CenteredCrossEntropy", "GlobalLoss"]
