"""Train SAEs on reward-model activations with sae-lens's training runner, offline.

The path is sae-lens's own: ``LanguageModelSAETrainingRunner(cfg, override_model=...,
override_dataset=...)``, its ``ActivationsStore`` (buffering, shuffling, special-token exclusion),
its ``SAETrainer`` (losses, schedules, dead-feature tracking, activation-norm folding) and its
``save_final_sae`` (``cfg.json`` with metadata, ``sae_weights.safetensors``,
``sparsity.safetensors``, ``runner_cfg.json``). Two things stand between the runner and a
:class:`~tl_reward.HookedRewardModel`, handled here:

1. The store calls ``model.run_with_cache(tokens, names_filter=..., stop_at_layer=...,
   prepend_bos=False)``. A reward model takes token ids that its own tokenizer produced (special
   tokens included) and has no ``prepend_bos``; :class:`_RunnerModel` is a ``HookedRootModule``
   whose ``run_with_cache`` is the reward model's, with ``prepend_bos`` dropped.
2. Given raw text the store packs texts into ``context_size`` windows, several unrelated texts per
   window: a reward model never sees that. Given pre-tokenized rows it reads each row as one
   context. So the texts are tokenized by the reward model, one text per row, right-padded with the
   pad id to the longest text, in an in-memory ``datasets.Dataset`` (no hub), and the pad id is
   excluded from training (``exclude_special_tokens=[pad_id]``): the SAE sees every real token of
   every text in its own context, and right padding leaves those activations unchanged (causal
   attention). If the pad id is also the eos id, eos positions are excluded too; transformers
   skips a trailing pad == eos when it pools, so the scoring token is still seen.

The runner's evaluator computes language-model cross-entropy; it runs only when logging to
wandb, which is off here.
"""

import contextlib
import copy
import functools
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from transformer_lens import HookedRootModule

from .._readout import choose
from ..data.pairs import PreferenceDataset
from ..errors import InvalidInputError, ModelSourceError
from ..model import HookedRewardModel, Text
from ._splice import check_sae

logger = logging.getLogger(__name__)

ARCHITECTURES = ("standard", "topk", "jumprelu")


class _RunnerModel(HookedRootModule):
    """What sae-lens's ``ActivationsStore`` needs of a model, over a HookedRewardModel."""

    def __init__(self, model: HookedRewardModel) -> None:
        super().__init__()
        self.__dict__["reward_model"] = model  # not a submodule: no parameters or hooks of its own
        self.tokenizer = model.tokenizer
        self.cfg = model.cfg

    @property
    def W_E(self) -> torch.Tensor:  # the store reads the input device from it
        return self.reward_model.W_E

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("the SAE training adapter only serves run_with_cache")

    def run_with_cache(self, tokens, *args, prepend_bos=None, **kwargs):  # noqa: ARG002
        return self.reward_model.run_with_cache(tokens, *args, **kwargs)


def _pad_id(model: HookedRewardModel) -> int:
    pad = model.pad_token_id
    if pad is None and model.tokenizer is not None:
        pad = model.tokenizer.pad_token_id
    if pad is None:
        raise InvalidInputError(
            "training needs a pad token id to pad texts and leave padding out; set "
            "model.pad_token_id"
        )
    return int(pad)


def sae_training_config(
    model: HookedRewardModel,
    hook: str,
    *,
    context_size: int,
    architecture: str = "standard",
    d_sae: int | None = None,
    training_tokens: int = 153_600,
    batch_size_tokens: int = 512,
    lr: float = 1e-2,
    normalize_activations: str = "none",
    seed: int = 0,
    output_path: str | os.PathLike | None = None,
    **sae_options: Any,
):
    """A sae-lens ``LanguageModelSAERunnerConfig`` for an SAE on ``hook`` of ``model``.

    Defaults are for small reward models (300 steps of 512 tokens at learning rate 1e-2; a
    billion-parameter model wants a smaller rate and far more tokens), each overridable:
    ``d_sae = 4 * d_in``; standard SAEs ``l1_coefficient=1.0`` with ``lp_norm=0.5``, TopK
    ``k = clamp(d_in // 8, 4, 32)``, JumpReLU ``l0_coefficient=1.0`` (any other field of the
    architecture's training config goes in ``sae_options``); no activation normalisation
    (sae-lens's default; ``"expected_average_only_in"`` is available); learning rate warm-up over
    the first 5% of steps and decay over the last 20%; sparsity warm-up over the first 5%; no
    wandb, no checkpoints; pad id excluded; one text per context (see the module docstring).

    Why ``lp_norm=0.5``: an L1 penalty (p = 1) costs the same whether one feature or several
    identical ones carry an activation, so rare large writes end up split across duplicate
    features. On the ``planted`` organism's final residual p = 1 spread the trigger circuit's write
    over 9 features with decoder cosine > 0.9 to it (the largest carrying 22% of the trigger pairs'
    margin); p = 0.5 penalises the split and kept one feature carrying all of it.
    """
    from sae_lens import (
        JumpReLUTrainingSAEConfig,
        LanguageModelSAERunnerConfig,
        LoggingConfig,
        StandardTrainingSAEConfig,
        TopKTrainingSAEConfig,
    )

    choose("architecture", architecture, ARCHITECTURES)
    choose("hook", hook, model.hook_dict)
    if context_size < 1 or context_size > model.cfg.n_ctx:
        raise InvalidInputError(f"context_size must be in 1..{model.cfg.n_ctx}, got {context_size}")
    if batch_size_tokens < 1 or training_tokens < batch_size_tokens:
        raise InvalidInputError(
            f"need 1 <= batch_size_tokens <= training_tokens, got {batch_size_tokens} and "
            f"{training_tokens}"
        )
    d_in = _hook_width(model, hook)
    steps = training_tokens // batch_size_tokens
    warm = max(1, steps // 20)
    common = dict(d_in=d_in, d_sae=d_sae or 4 * d_in, dtype=_dtype_name(model.cfg.dtype),
                  device=str(model.cfg.device), normalize_activations=normalize_activations)
    if architecture == "standard":
        sae_cfg = StandardTrainingSAEConfig(**{"l1_coefficient": 1.0, "lp_norm": 0.5,
                                               "l1_warm_up_steps": warm, **common, **sae_options})
    elif architecture == "topk":
        sae_cfg = TopKTrainingSAEConfig(**{"k": min(32, max(4, d_in // 8)), **common, **sae_options})
    else:
        sae_cfg = JumpReLUTrainingSAEConfig(**{"l0_coefficient": 1.0, "l0_warm_up_steps": warm,
                                               **common, **sae_options})
    window = max(1, steps // 4)
    return LanguageModelSAERunnerConfig(
        sae=sae_cfg,
        model_name=model.cfg.model_name,
        model_class_name=type(model).__name__,
        hook_name=hook,
        dataset_path="",
        streaming=False,
        is_dataset_tokenized=True,
        context_size=context_size,
        prepend_bos=False,
        exclude_special_tokens=[_pad_id(model)],
        training_tokens=training_tokens,
        train_batch_size_tokens=batch_size_tokens,
        store_batch_size_prompts=256,
        # sae-lens's buffer holds n_batches_in_buffer * context_size tokens; keep >= 4 batches
        n_batches_in_buffer=max(8, math.ceil(4 * batch_size_tokens / context_size)),
        n_batches_for_norm_estimate=20,
        lr=lr,
        lr_warm_up_steps=warm,
        lr_decay_steps=max(1, steps // 5),
        dead_feature_window=window,
        feature_sampling_window=window,
        device=str(model.cfg.device),
        dtype=_dtype_name(model.cfg.dtype),
        seed=seed,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=None,
        output_path=None if output_path is None else str(output_path),
        model_from_pretrained_kwargs={},
        verbose=False,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _hook_width(model: HookedRewardModel, hook: str) -> int:
    """Width of the activation at ``hook`` (heads flattened), from a one-token forward."""
    store = {}

    def keep(act, hook):
        store["shape"] = act.shape
        return act

    tokens = torch.zeros(1, 1, dtype=torch.long, device=model.cfg.device)
    if model.pad_token_id == 0:
        tokens += 1 if model.cfg.d_vocab > 1 else 0
    with torch.no_grad():
        model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(hook, keep)])
    shape = store["shape"]
    if len(shape) < 3:
        raise InvalidInputError(f"{hook!r} has no position axis; train an SAE on a per-token hook")
    return math.prod(shape[2:])


@contextlib.contextmanager
def _quiet(progress: bool):
    """Silence sae-lens's expected warnings (override notices, epoch restarts on a small dataset)
    and, without ``progress``, its progress bars (sae-lens has no switch for them: its modules'
    ``tqdm`` is swapped for a disabled one); restore everything on exit."""
    from unittest import mock

    from sae_lens.training import activation_scaler, sae_trainer
    from tqdm.auto import tqdm

    sae_logger = logging.getLogger("sae_lens")
    level = sae_logger.level
    sae_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            for message in ("All samples in the training dataset", "The training dataset contains",
                            "This SAE has non-empty model_from_pretrained_kwargs",
                            "To copy construct from a tensor"):
                warnings.filterwarnings("ignore", message=message)
            if not progress:
                silent = functools.partial(tqdm, disable=True)
                for module in (sae_trainer, activation_scaler):
                    stack.enter_context(mock.patch.object(module, "tqdm", silent))
            yield
    finally:
        sae_logger.setLevel(level)


def train_sae(
    model: HookedRewardModel,
    texts: Sequence[Text] | PreferenceDataset,
    hook: str,
    *,
    config: Any = None,
    output_path: str | os.PathLike | None = None,
    progress: bool = True,
    **config_kwargs: Any,
) -> SAE:
    """Train an SAE on ``hook`` activations of ``model`` over ``texts`` with sae-lens's runner.

    Args:
        texts: strings or chats, or a :class:`~tl_reward.data.PreferenceDataset` (its chosen and
            rejected texts).
        hook: a hook of the model with a position axis (``"blocks.1.hook_resid_post"``, ...).
        config: a ``LanguageModelSAERunnerConfig``; built by :func:`sae_training_config` from
            ``config_kwargs`` (``architecture``, ``d_sae``, ``training_tokens``, ``lr``, ``seed``,
            ``l1_coefficient``, ``k``, ...) when not given.
        output_path: where sae-lens saves the SAE (``cfg.json`` with the metadata, weights,
            sparsity, runner config); a temporary directory when not given.

    Returns the trained SAE as sae-lens's inference class (``StandardSAE``, ``TopKSAE``,
    ``JumpReLUSAE``), loaded back from the saved files with ``SAE.load_from_disk``, with
    ``cfg.metadata.hook_name`` set and tl_reward's training facts in ``cfg.metadata.tl_reward``.
    Seeded (``seed``) without touching the global random state.
    """
    import datasets
    from sae_lens import LanguageModelSAETrainingRunner

    if isinstance(texts, PreferenceDataset):
        texts = list(texts.chosen_texts) + list(texts.rejected_texts)
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise InvalidInputError("no texts to train on")
    ids = model.tokenize(texts)
    longest = max(len(x) for x in ids)
    if config is None:
        config = sae_training_config(model, hook, context_size=longest, output_path=output_path,
                                     **config_kwargs)
    elif config_kwargs:
        raise InvalidInputError(f"pass either config= or config options, not both: {sorted(config_kwargs)}")
    if config.hook_name != hook:
        raise InvalidInputError(f"config.hook_name is {config.hook_name!r} but hook={hook!r}")
    if config.context_size < longest:
        raise InvalidInputError(
            f"the longest text has {longest} tokens but config.context_size={config.context_size}; "
            "raise it (tl_reward never truncates silently)"
        )
    pad = _pad_id(model)
    rows = [x + [pad] * (config.context_size - len(x)) for x in ids]
    dataset = datasets.Dataset.from_dict({"tokens": rows})
    n_tokens = sum(len(x) for x in ids)
    config = copy.copy(config)  # the output path may be filled in below: leave the caller's alone
    with contextlib.ExitStack() as stack:
        out = config.output_path
        if out is None:
            out = stack.enter_context(tempfile.TemporaryDirectory(prefix="tl_reward_sae_"))
            config.output_path = out
        stack.enter_context(_quiet(progress))
        stack.enter_context(torch.random.fork_rng(devices=[]))
        torch.manual_seed(config.seed)
        runner = LanguageModelSAETrainingRunner(config, override_dataset=dataset,
                                                override_model=_RunnerModel(model))
        runner.sae.cfg.metadata.tl_reward = {
            "n_texts": len(texts), "n_tokens_per_epoch": n_tokens,
            "epochs": config.training_tokens / n_tokens, "pad_token_id": pad,
            "positions": "every non-padding token, one text per context",
            "model": {"architecture": model.cfg.original_architecture,
                      "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model},
        }
        runner.run()
        sae = SAE.load_from_disk(out, device=str(model.cfg.device))
    logger.info("trained %s SAE on %s: %s", sae.cfg.architecture(), hook,
                {k: sae.cfg.metadata.get(k) for k in ("l0", "num_dead_features")})
    return sae


def load_sae(path: str | os.PathLike, model: HookedRewardModel | None = None) -> SAE:
    """Load an SAE saved by sae-lens (``cfg.json`` + ``sae_weights.safetensors``) from a local
    directory; with ``model``, on its device and dtype and checked against it. Never downloads."""
    path = Path(path)
    if not (path / "cfg.json").exists():
        raise ModelSourceError(
            f"{str(path)!r} has no cfg.json; pass a directory written by sae-lens (sae.save_model, "
            "train_sae(output_path=...)). Hub releases are not fetched: download them yourself."
        )
    with _quiet(progress=True):
        sae = SAE.load_from_disk(path, device="cpu" if model is None else str(model.cfg.device))
    if model is not None:
        sae = sae.to(dtype=model.cfg.dtype)
        check_sae(model, sae)
    return sae
