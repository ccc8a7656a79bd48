"""GLARE's four consistency terms, one small module each, all DINO-style cross-entropies."""

from glare.losses.centered_ce import CenteredCrossEntropy
from glare.losses.global_loss import GlobalLoss
from glare.losses.local_interview import InterViewLocalLoss
from glare.losses.local_patch import PatchConsistencyLoss
from glare.losses.regional import RegionalLoss

__all__ = ["CenteredCrossEntropy", "GlobalLoss", "InterViewLocalLoss", "PatchConsistencyLoss", "RegionalLoss"]
