"""tl_reward: mechanistic interpretability of RLHF reward models on TransformerLens hooks.

The public names load on first use (PEP 562), so ``import tl_reward`` and the ``tl-reward``
command start without importing torch; ``from tl_reward import HookedRewardModel`` works as usual.
A new public name goes into ``_EXPORTS`` (name -> submodule) and the ``TYPE_CHECKING`` block.
"""

from typing import TYPE_CHECKING

from . import errors as errors
from .errors import TLRewardError as TLRewardError

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "memory_budget": "_memory",
    "set_memory_budget": "_memory",
    "AgreementReport": "causal.agreement",
    "agreement_report": "causal.agreement",
    "compare_attribution_and_patching": "causal.agreement",
    "AtPResult": "causal.atp",
    "attribution_patch": "causal.atp",
    "AttributionResult": "observational.attribution",
    "direct_reward_attribution": "observational.attribution",
    "pair_reward_attribution": "observational.attribution",
    "compare_reward_models": "observational.compare",
    "reward_term_conflict": "observational.compare",
    "concept_dose_response": "observational.concepts",
    "concept_vector": "observational.concepts",
    "divergence_aware_patch": "causal.divergence",
    "GatedOutputs": "causal.gated",
    "gate_patch": "causal.gated",
    "gated_outputs": "causal.gated",
    "HeadAttributionResult": "observational.nonlinear_attribution",
    "gate_attribution": "observational.nonlinear_attribution",
    "head_attribution": "observational.nonlinear_attribution",
    "GatedHead": "heads",
    "MLPHead": "heads",
    "StepRewards": "process",
    "StepPatchResult": "causal.step_analysis",
    "step_patch": "causal.step_analysis",
    "step_attribution_patch": "causal.step_analysis",
    "distortion_index": "hacking",
    "effort_distortion": "hacking",
    "probe_cascade": "hacking",
    "ImplicitRewardModel": "implicit",
    "TextReward": "text_reward",
    "RewardInputs": "text_reward",
    "ResponseBatch": "implicit",
    "response_batch_from_ids": "implicit",
    "ImplicitAttributionResult": "implicit_analysis",
    "ImplicitLensResult": "implicit_analysis",
    "ImplicitPatchResult": "implicit_analysis",
    "ImplicitPositionPatchResult": "implicit_analysis",
    "implicit_position_patch": "implicit_analysis",
    "implicit_activation_patch": "implicit_analysis",
    "implicit_attribution_patch": "implicit_analysis",
    "implicit_reward_attribution": "implicit_analysis",
    "implicit_reward_lens": "implicit_analysis",
    "HookedJudgeModel": "judge",
    "load_causal_lm": "loading.causal_lm",
    "load_implicit_reward_model": "loading.causal_lm",
    "load_judge_reward_model": "loading.causal_lm",
    "LensResult": "observational.lens",
    "PairLensResult": "observational.lens",
    "pair_reward_lens": "observational.lens",
    "reward_lens": "observational.lens",
    "load_reward_model": "loading",
    "supported_architectures": "loading",
    "HookedRewardModel": "model",
    "PairScores": "texts",
    "SuspectInputWarning": "texts",
    "PatchResult": "causal.patching",
    "activation_patch": "causal.patching",
    "activation_patch_grids": "causal.patching",
    "path_patch": "causal.path_patching",
    "ProbeReport": "probes",
    "localise_probe": "probes",
    "run_probes": "probes",
    "TunedRewardLens": "observational.tuned_lens",
    # the SAE tools import sae-lens (and with it datasets and wandb)
    "SAEAttributionResult": "sae",
    "sae_pair_attribution": "sae",
    "sae_reward_attribution": "sae",
    "train_sae": "sae",
}

__all__ = ["TLRewardError", "errors", "__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tl_reward' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from ._memory import memory_budget as memory_budget
    from ._memory import set_memory_budget as set_memory_budget
    from .causal.agreement import AgreementReport as AgreementReport
    from .causal.agreement import agreement_report as agreement_report
    from .causal.agreement import (
        compare_attribution_and_patching as compare_attribution_and_patching,
    )
    from .causal.atp import AtPResult as AtPResult
    from .causal.atp import attribution_patch as attribution_patch
    from .causal.divergence import divergence_aware_patch as divergence_aware_patch
    from .causal.gated import GatedOutputs as GatedOutputs
    from .causal.gated import gate_patch as gate_patch
    from .causal.gated import gated_outputs as gated_outputs
    from .causal.patching import PatchResult as PatchResult
    from .causal.patching import activation_patch as activation_patch
    from .causal.patching import activation_patch_grids as activation_patch_grids
    from .causal.path_patching import path_patch as path_patch
    from .causal.step_analysis import StepPatchResult as StepPatchResult
    from .causal.step_analysis import step_attribution_patch as step_attribution_patch
    from .causal.step_analysis import step_patch as step_patch
    from .hacking import distortion_index as distortion_index
    from .hacking import effort_distortion as effort_distortion
    from .hacking import probe_cascade as probe_cascade
    from .heads import GatedHead as GatedHead
    from .heads import MLPHead as MLPHead
    from .implicit import ImplicitRewardModel as ImplicitRewardModel
    from .implicit import ResponseBatch as ResponseBatch
    from .implicit import response_batch_from_ids as response_batch_from_ids
    from .implicit_analysis import ImplicitAttributionResult as ImplicitAttributionResult
    from .implicit_analysis import ImplicitLensResult as ImplicitLensResult
    from .implicit_analysis import ImplicitPatchResult as ImplicitPatchResult
    from .implicit_analysis import ImplicitPositionPatchResult as ImplicitPositionPatchResult
    from .implicit_analysis import implicit_activation_patch as implicit_activation_patch
    from .implicit_analysis import implicit_attribution_patch as implicit_attribution_patch
    from .implicit_analysis import implicit_position_patch as implicit_position_patch
    from .implicit_analysis import implicit_reward_attribution as implicit_reward_attribution
    from .implicit_analysis import implicit_reward_lens as implicit_reward_lens
    from .judge import HookedJudgeModel as HookedJudgeModel
    from .loading import load_reward_model as load_reward_model
    from .loading import supported_architectures as supported_architectures
    from .loading.causal_lm import load_causal_lm as load_causal_lm
    from .loading.causal_lm import load_implicit_reward_model as load_implicit_reward_model
    from .loading.causal_lm import load_judge_reward_model as load_judge_reward_model
    from .model import HookedRewardModel as HookedRewardModel
    from .observational.attribution import AttributionResult as AttributionResult
    from .observational.attribution import direct_reward_attribution as direct_reward_attribution
    from .observational.attribution import pair_reward_attribution as pair_reward_attribution
    from .observational.compare import compare_reward_models as compare_reward_models
    from .observational.compare import reward_term_conflict as reward_term_conflict
    from .observational.concepts import concept_dose_response as concept_dose_response
    from .observational.concepts import concept_vector as concept_vector
    from .observational.lens import LensResult as LensResult
    from .observational.lens import PairLensResult as PairLensResult
    from .observational.lens import pair_reward_lens as pair_reward_lens
    from .observational.lens import reward_lens as reward_lens
    from .observational.nonlinear_attribution import HeadAttributionResult as HeadAttributionResult
    from .observational.nonlinear_attribution import gate_attribution as gate_attribution
    from .observational.nonlinear_attribution import head_attribution as head_attribution
    from .observational.tuned_lens import TunedRewardLens as TunedRewardLens
    from .probes import ProbeReport as ProbeReport
    from .probes import localise_probe as localise_probe
    from .probes import run_probes as run_probes
    from .process import StepRewards as StepRewards
    from .sae import SAEAttributionResult as SAEAttributionResult
    from .sae import sae_pair_attribution as sae_pair_attribution
    from .sae import sae_reward_attribution as sae_reward_attribution
    from .sae import train_sae as train_sae
    from .text_reward import RewardInputs as RewardInputs
    from .text_reward import TextReward as TextReward
    from .texts import PairScores as PairScores
    from .texts import SuspectInputWarning as SuspectInputWarning
