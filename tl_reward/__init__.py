"""tl_reward: mechanistic interpretability of RLHF reward models on TransformerLens hooks."""

from . import errors as errors
from .agreement import AgreementReport as AgreementReport
from .agreement import agreement_report as agreement_report
from .agreement import compare_attribution_and_patching as compare_attribution_and_patching
from .atp import AtPResult as AtPResult
from .atp import attribution_patch as attribution_patch
from .attribution import AttributionResult as AttributionResult
from .attribution import direct_reward_attribution as direct_reward_attribution
from .attribution import pair_reward_attribution as pair_reward_attribution
from .compare import compare_reward_models as compare_reward_models
from .compare import reward_term_conflict as reward_term_conflict
from .concepts import concept_dose_response as concept_dose_response
from .concepts import concept_vector as concept_vector
from .divergence import divergence_aware_patch as divergence_aware_patch
from .errors import TLRewardError as TLRewardError
from .hacking import distortion_index as distortion_index
from .hacking import probe_cascade as probe_cascade
from .implicit import ImplicitRewardModel as ImplicitRewardModel
from .implicit import ResponseBatch as ResponseBatch
from .implicit import response_batch_from_ids as response_batch_from_ids
from .implicit_analysis import ImplicitAttributionResult as ImplicitAttributionResult
from .implicit_analysis import ImplicitLensResult as ImplicitLensResult
from .implicit_analysis import ImplicitPatchResult as ImplicitPatchResult
from .implicit_analysis import implicit_activation_patch as implicit_activation_patch
from .implicit_analysis import implicit_attribution_patch as implicit_attribution_patch
from .implicit_analysis import implicit_reward_attribution as implicit_reward_attribution
from .implicit_analysis import implicit_reward_lens as implicit_reward_lens
from .judge import HookedJudgeModel as HookedJudgeModel
from .lens import LensResult as LensResult
from .lens import PairLensResult as PairLensResult
from .lens import pair_reward_lens as pair_reward_lens
from .lens import reward_lens as reward_lens
from .loading import load_reward_model as load_reward_model
from .loading import supported_architectures as supported_architectures
from .loading.causal_lm import load_causal_lm as load_causal_lm
from .loading.causal_lm import load_implicit_reward_model as load_implicit_reward_model
from .loading.causal_lm import load_judge_reward_model as load_judge_reward_model
from .model import HookedRewardModel as HookedRewardModel
from .model import PairScores as PairScores
from .patching import PatchResult as PatchResult
from .patching import activation_patch as activation_patch
from .patching import activation_patch_grids as activation_patch_grids
from .path_patching import path_patch as path_patch
from .probes import ProbeReport as ProbeReport
from .probes import localise_probe as localise_probe
from .probes import run_probes as run_probes
from .tuned_lens import TunedRewardLens as TunedRewardLens

__version__ = "0.1.0"

# The SAE tools import sae-lens (and with it datasets and wandb): loaded on first use.
_SAE_NAMES = ("SAEAttributionResult", "sae_pair_attribution", "sae_reward_attribution", "train_sae")


def __getattr__(name: str):
    if name in _SAE_NAMES:
        from . import sae

        return getattr(sae, name)
    raise AttributeError(f"module 'tl_reward' has no attribute {name!r}")
