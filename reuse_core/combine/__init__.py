"""Combining trained models: parallel ensembles (batched training, weights, voting), sequential
cascades (calibration, threshold sweeps), model soups and model merging (task arithmetic, TIES,
DARE, SLERP, stacked heads). Torch-level pieces; the ``ensemble``, ``cascade``, ``soup`` and
``merge`` strategies build on them."""
from .batched import BatchedMembers, member_loss
from .calibration import expected_calibration_error, fit_temperature
from .cascade import Cascade, CascadePoint, choose, flops_per_sample, seconds_per_sample, sweep
from .ensemble import COMBINES, Ensemble, collect_logits
from .merge import METHODS as MERGE_METHODS
from .merge import SCALE_GRID, MergeError, merge, stack_heads, stack_logits, union_classes
from .soup import GreedySoup, Ingredient, SoupError, check_ingredients, greedy_soup, uniform_soup
from .weights import (WEIGHTINGS, accuracy_weights, choose_weights, learn_weights, majority_vote, member_accuracies,
                      uniform_weights)

__all__ = [
    "BatchedMembers", "COMBINES", "Cascade", "CascadePoint", "Ensemble", "GreedySoup", "Ingredient", "MERGE_METHODS",
    "MergeError", "SCALE_GRID", "SoupError", "WEIGHTINGS", "accuracy_weights", "check_ingredients", "choose",
    "choose_weights", "collect_logits", "expected_calibration_error", "fit_temperature", "flops_per_sample",
    "greedy_soup", "learn_weights", "majority_vote", "member_accuracies", "member_loss", "merge", "seconds_per_sample",
    "stack_heads", "stack_logits", "sweep", "uniform_soup", "uniform_weights", "union_classes",
]
