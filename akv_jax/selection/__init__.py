"""Token selection: scorers (which tokens to keep) and budgets (how many, per layer and per head).

Scores are f32[B, K, S], one per kv head, higher = keep, -inf at padding; budgets are static per-layer ints
or i32[B, K] per-head arrays. Each scorer is one module; importing it registers it (`base.SCORERS`).
"""

from .base import SCORERS as SCORERS
from .base import Needs as Needs
from .base import Observations as Observations
from .base import Reconstruct as Reconstruct
from .base import Scorer as Scorer
from .base import register as register
from .base import scorer as scorer
from .budgets import BUDGETS as BUDGETS
from .budgets import AdaKV as AdaKV
from .budgets import Adaptive as Adaptive
from .budgets import Budget as Budget
from .budgets import Pyramid as Pyramid
from .budgets import Uniform as Uniform
from .budgets import adakv_head_budgets as adakv_head_budgets
from .budgets import pyramid_budgets as pyramid_budgets
from .budgets import uniform_budgets as uniform_budgets
# The registry: one line per scorer.
from .streaming import Streaming as Streaming, streaming_scores as streaming_scores
from .snapkv import SnapKV as SnapKV, snapkv_scores as snapkv_scores
from .snapkv import snapkv_scores_from_votes as snapkv_scores_from_votes
from .h2o import H2O as H2O, h2o_scores as h2o_scores, h2o_scores_from_votes as h2o_scores_from_votes
from .tova import TOVA as TOVA, tova_scores as tova_scores
from .knorm import KNorm as KNorm, knorm_scores as knorm_scores
from .expected_attention import ExpectedAttention as ExpectedAttention
from .expected_attention import expected_attention_scores as expected_attention_scores
from .kvzip import KVzip as KVzip, kvzip_scores_from_votes as kvzip_scores_from_votes
