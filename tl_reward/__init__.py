"""tl_reward: mechanistic interpretability of RLHF reward models on TransformerLens hooks."""

from .errors import TLRewardError as TLRewardError
from .loading import load_reward_model as load_reward_model
from .loading import supported_architectures as supported_architectures
from .model import HookedRewardModel as HookedRewardModel
from .model import PairScores as PairScores

__version__ = "0.1.0"
