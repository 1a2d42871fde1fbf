"""SAE feature attribution for reward models, on sae-lens SAEs.

sae-lens provides the SAEs (standard, TopK, JumpReLU, ...: loaded from a local directory with
:func:`load_sae` / ``SAE.load_from_disk``, or trained here with :func:`train_sae`, which drives
sae-lens's own training runner), and the way they are spliced into a TransformerLens model
(``HookedSAETransformer``), which :func:`attach_saes` applies to a reward model. tl_reward adds the
attribution of the pooled reward and of a pair's margin to SAE features
(:func:`sae_reward_attribution`, :func:`sae_pair_attribution`), the causal check
(:func:`sae_feature_ablation`), and dataset-level views (:func:`sae_dataset_features`,
:func:`sae_feature_activations`).

Modules: ``_splice`` (attaching SAEs, the sae-lens coupling), ``attribution``, ``ablation``,
``features`` (activations over tokens, dataset views), ``training`` (the sae-lens runner).
"""

from ._splice import NotAnSAEError as NotAnSAEError
from ._splice import SAEMismatchError as SAEMismatchError
from ._splice import attach_saes as attach_saes
from ._splice import check_sae as check_sae
from .ablation import FeatureAblationResult as FeatureAblationResult
from .ablation import sae_feature_ablation as sae_feature_ablation
from .ablation import sae_pair_feature_ablation as sae_pair_feature_ablation
from .attribution import SAEAttributionResult as SAEAttributionResult
from .attribution import sae_pair_attribution as sae_pair_attribution
from .attribution import sae_reward_attribution as sae_reward_attribution
from .features import FeatureActivations as FeatureActivations
from .features import SAEFeatureSummary as SAEFeatureSummary
from .features import sae_dataset_features as sae_dataset_features
from .features import sae_feature_activations as sae_feature_activations
from .training import load_sae as load_sae
from .training import sae_training_config as sae_training_config
from .training import train_sae as train_sae

__all__ = [
    "FeatureAblationResult", "FeatureActivations", "NotAnSAEError", "SAEAttributionResult",
    "SAEFeatureSummary", "SAEMismatchError", "attach_saes", "check_sae", "load_sae",
    "sae_dataset_features", "sae_feature_ablation", "sae_feature_activations",
    "sae_pair_attribution", "sae_pair_feature_ablation", "sae_reward_attribution",
    "sae_training_config", "train_sae",
]
