"""Token selection: importance scores (which tokens to keep) and budgets (how many, per layer and per head).

Scores are f32[B, K, S], one per kv head, higher = keep, -inf at padding; budgets are static per-layer ints
or i32[B, K] per-head arrays.
"""

from .budgets import adakv_head_budgets as adakv_head_budgets
from .budgets import pyramid_budgets as pyramid_budgets
from .budgets import uniform_budgets as uniform_budgets
from .scores import h2o_scores as h2o_scores
from .scores import h2o_scores_from_votes as h2o_scores_from_votes
from .scores import knorm_scores as knorm_scores
from .scores import snapkv_scores as snapkv_scores
from .scores import snapkv_scores_from_votes as snapkv_scores_from_votes
from .scores import streaming_scores as streaming_scores
from .scores import tova_scores as tova_scores
