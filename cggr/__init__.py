"""cggr: confidence-gated gradient routing for transformer training.

Each training step scores every token's difficulty from the model's own
logits, sorts tokens into buckets, and lets easy tokens' gradients run only
through the top of the block stack; the backward pass really does less work.

Public API:
    CGGRWrapper            -- nn.Module wrapper (``model = CGGRWrapper(model)``)
    attach                 -- install routing on a model in place, returns a Router
    RoutingConfig          -- every option, typed and documented (attach takes it and/or its fields)
    score_difficulty       -- logits -> Scores(difficulty, entropy, confidence)
    assign_depths          -- scores, valid mask -> gradient depth per token
    reference_routing      -- the slow reference routed backward (forward hooks)
"""

from .config import RoutingConfig
from .bucketing import assign_depths, curriculum_depths, rank_buckets, target_depths
from .reference import reference_routing
from .router import Router, attach
from .routing import Routing
from .scoring import Scores, score_difficulty
from .wrapper import CGGRWrapper

__version__ = "0.1.0"

__all__ = [
    "CGGRWrapper", "attach", "Router", "RoutingConfig", "Routing", "Scores", "score_difficulty", "assign_depths",
    "rank_buckets", "target_depths", "curriculum_depths", "reference_routing", "__version__",
]
