"""Reward heads: what maps the final-normalised residual at the scoring token to the rewards.

Every head is a :class:`RewardHead` held as ``model.reward_head``, with hook points at each
intermediate (shapes in comments)::

    reward_head.hook_pooled      # [batch, d_model]  what the head reads (every kind)
    reward_head.hook_hidden      # [batch, d_hidden] MLP heads: the last hidden layer, activated
    reward_head.hook_prompt      # [batch, d_model]  gated heads: the state at the end of the prompt
    reward_head.hook_objectives  # [batch, k]        gated heads: the k objective rewards
    reward_head.hook_gate        # [batch, k]        gated heads: the gate weights
    reward_head.hook_reward      # [batch, n_rewards] the head's output (every kind)

Kinds (:data:`HEAD_KINDS`, one class each):

- ``linear``: ``r = W_R^T h + b_R``, the HF ``score`` Linear. Its weights are the model's
  TransformerLens ``unembed`` (so ``fold_ln`` folds the final norm into it); every tool applies.
- ``mlp``: Linear -> activation -> ... -> Linear on the pooled state, the value head of the GRM
  family, INF-ORM-Llama3.1-70B's ``score`` (Sequential(Linear(h, h), ReLU, Linear(h, 1)) read at
  the last token; source: ``INFORMForSequenceClassification`` as reproduced in public evaluation
  code) and the per-token head of Qwen2.5-Math-PRM (the same with 2 outputs, the step score
  ``softmax(logits)[..., 1]`` at each step-separator token ``<extra_0>``; source: the
  ``Qwen2ForProcessRewardModel`` classes of vLLM and SGLang, which load that checkpoint). Layout as published in GRM's ``ValueHead`` (``summary`` = ``nn.Sequential`` of
  ``vhead_num_layers`` x (Linear(., vhead_num_neurons), ReLU) then Linear(., 1); state keys
  ``v_head.summary.{0,2,..}.weight/bias``; dropout off in eval; the reward read at the last
  token of ``hidden_states[-1]``, the final-normalised state). Source: Ray2333/GRM-* model code
  (``GRewardModel`` / ``ValueHead``), as mirrored in public GitHub copies of that code.
- ``gated``: ArmoRM. A bias-free regression layer gives k objective rewards at the scoring token;
  a gating network (``n_hidden`` x (Linear, ReLU), then Linear with bias) on the state at the end
  of the prompt gives logits, ``softmax(logits / temperature) * logit_scale`` are the k gate
  weights; the score is ``sum_k gate_k * (objectives @ reward_transform_matrix)_k``. State keys
  ``regression_layer.weight``, ``gating.layers.{i}.weight/bias``, ``gating.logit_scale``,
  ``reward_transform_matrix`` (the temperature is a config value, ``gating_temperature``,
  default 10). Source: ``modeling_custom.py`` of RLHFlow/ArmoRM-Llama3-8B-v0.1
  (``LlamaForRewardModelWithGating``, ``GatingNetwork``, ``find_token_for_gating``), as mirrored
  in public GitHub copies.
- ``custom``: any ``nn.Module`` mapping the pooled state ``[batch, d_model]`` to rewards
  ``[batch, n_rewards]`` (or ``[batch]``).

The end of the prompt (gated heads). ArmoRM gates on the first token of the last occurrence of a
fixed token pattern, ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`` in Llama-3
ids (:data:`ARMORM_LLAMA3_GATE_PATTERN`), i.e. the end-of-turn token that closes the prompt.
Here the pattern is an explicit argument of :class:`GatedHead` (no default: it depends on the
tokenizer and chat template), the same rule is applied (last occurrence, its first token), only
among real tokens (attention mask 1) up to the scoring token; a row without it is an error.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from .errors import HeadError, InvalidInputError

ARMORM_LLAMA3_GATE_PATTERN: tuple[int, ...] = (128009, 128006, 78191, 128007, 271)
"""Llama-3 ids of ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n``, the pattern
ArmoRM-Llama3-8B-v0.1 gates on (its ``modeling_custom.py``)."""

ACTIVATIONS: Mapping[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh,
}


class RewardHead(nn.Module):
    """The linear head (kind ``linear``) and the base of every head kind.

    Its weights are the model's ``unembed`` (``W_R`` [d_model, n_rewards], ``b_R``), passed in:
    TransformerLens's weight processing folds the final norm into them.
    """

    kind: ClassVar[str] = "linear"
    is_linear: ClassVar[bool] = True
    reads_prompt_end: ClassVar[bool] = False  # also reads the state at the end of the prompt

    def __init__(self) -> None:
        super().__init__()
        self.hook_pooled = HookPoint()  # [batch, d_model]
        self.hook_reward = HookPoint()  # [batch, n_rewards]

    def n_outputs(self, d_model: int) -> int | None:
        """Number of rewards it returns (``None``: the model's ``unembed`` decides)."""
        return None

    def compute(
        self, pooled: Float[Tensor, "*batch d_model"], unembed: nn.Module,
        prompt: Float[Tensor, "*batch d_model"] | None = None,
    ) -> Float[Tensor, "*batch n_rewards"]:
        """The head's output without hook points (any leading dimensions)."""
        return pooled @ unembed.W_U + unembed.b_U

    def forward(
        self, pooled: Float[Tensor, "batch d_model"], unembed: nn.Module,
        prompt: Float[Tensor, "batch d_model"] | None = None,
    ) -> Float[Tensor, "batch n_rewards"]:
        pooled = self.hook_pooled(pooled)
        return self.hook_reward(self.compute(pooled, unembed, prompt))

    def prompt_end(
        self, tokens: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"] | None,
        pool_index: Int[Tensor, "batch"],
    ) -> Int[Tensor, "batch"]:
        """Position of the end of the prompt in each row (gated heads only)."""
        raise HeadError(f"a {self.kind} head reads no prompt position")


class MLPHead(RewardHead):
    """An MLP value head: ``n_layers`` x (Linear, activation), then Linear (GRM's layout).

    ``summary`` is the published ``nn.Sequential`` (``summary.0`` the first Linear, ``summary.1``
    its activation, ...); ``hook_hidden`` is the activated last hidden layer, which the output
    Linear reads.
    """

    kind = "mlp"
    is_linear = False

    def __init__(self, d_model: int, d_hidden: int, n_outputs: int = 1, *, n_layers: int = 1,
                 activation: str = "relu", bias: bool = True) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise HeadError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        if n_layers < 1 or d_hidden < 1 or n_outputs < 1:
            raise HeadError(
                f"an MLP head needs n_layers, d_hidden, n_outputs >= 1, got {n_layers}, "
                f"{d_hidden}, {n_outputs}"
            )
        self.activation = activation
        layers: list[nn.Module] = []
        width = d_model
        for _ in range(n_layers):
            layers += [nn.Linear(width, d_hidden, bias=bias), ACTIVATIONS[activation]()]
            width = d_hidden
        layers.append(nn.Linear(width, n_outputs, bias=bias))
        self.summary = nn.Sequential(*layers)
        self.hook_hidden = HookPoint()  # [batch, d_hidden]

    def n_outputs(self, d_model: int) -> int:
        return self.summary[-1].out_features

    def _run(self, x: Tensor, hook: bool) -> Tensor:
        for layer in self.summary[:-1]:
            x = layer(x)
        if hook:
            x = self.hook_hidden(x)
        return self.summary[-1](x)

    def compute(self, pooled, unembed, prompt=None):
        return self._run(pooled, hook=False)

    def forward(self, pooled, unembed, prompt=None):
        pooled = self.hook_pooled(pooled)
        return self.hook_reward(self._run(pooled, hook=True))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], *, prefix: str = "summary.",
                        activation: str = "relu") -> "MLPHead":
        """An MLP head from a published ``nn.Sequential``'s state: ``{prefix}{i}.weight`` (and
        ``.bias``) for its Linear layers at even ``i``. GRM: ``prefix="v_head.summary."``;
        Qwen2.5-Math-PRM: ``prefix="score."``."""
        keys = sorted(
            (int(k[len(prefix):].split(".")[0]), k)
            for k in state if k.startswith(prefix) and k.endswith(".weight")
            and k[len(prefix):].split(".")[0].isdigit()
        )
        if len(keys) < 2:
            raise HeadError(
                f"no MLP head in this state dict: expected {prefix}<i>.weight for at least two "
                f"Linear layers, found {[k for _, k in keys]}"
            )
        weights = [state[k] for _, k in keys]
        head = cls(weights[0].shape[1], weights[0].shape[0], weights[-1].shape[0],
                   n_layers=len(weights) - 1, activation=activation,
                   bias=f"{prefix}{keys[0][0]}.bias" in state)
        mine = {f"summary.{2 * j}.{p}": state[f"{prefix}{i}.{p}"]
                for j, (i, _) in enumerate(keys) for p in ("weight", "bias")
                if f"{prefix}{i}.{p}" in state}
        head.load_state_dict(mine)
        return head


class _GatingNetwork(nn.Module):
    """ArmoRM's gating MLP: ``n_hidden`` x (Linear, ReLU), Linear; softmax(x / T) * scale."""

    def __init__(self, d_model: int, k: int, hidden_dim: int, n_hidden: int, bias: bool,
                 temperature: float, logit_scale: float) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.logit_scale = nn.Parameter(torch.ones(1) * logit_scale)
        widths = [d_model] + [hidden_dim] * n_hidden
        self.layers = nn.ModuleList(
            [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
            + [nn.Linear(widths[-1], k, bias=bias)]
        )
        self.relu = nn.ReLU()  # a module, so that its kinks can be found (head_attribution)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = self.relu(layer(x))
        x = self.layers[-1](x)
        return torch.softmax(x / self.temperature, dim=-1) * self.logit_scale[0]


class GatedHead(RewardHead):
    """ArmoRM's gated multi-objective head (see the module docstring for the published layout).

    ``gate_pattern``: the token ids whose last occurrence marks the end of the prompt (ArmoRM on
    Llama-3: :data:`ARMORM_LLAMA3_GATE_PATTERN`); the gate reads the state at its first token.
    The head returns the scalar score ``[batch, 1]``; the k objective rewards and the gate weights
    are its hook points ``hook_objectives`` and ``hook_gate`` (:func:`tl_reward.gated_outputs`).
    """

    kind = "gated"
    is_linear = False
    reads_prompt_end = True

    def __init__(self, d_model: int, n_objectives: int, gate_pattern: Sequence[int], *,
                 hidden_dim: int = 1024, n_hidden: int = 3, temperature: float = 10.0,
                 logit_scale: float = 1.0, gate_bias: bool = True,
                 objective_names: Sequence[str] | None = None) -> None:
        super().__init__()
        pattern = [int(t) for t in gate_pattern]
        if not pattern:
            raise HeadError("gate_pattern is empty; pass the token ids that end the prompt")
        if temperature <= 0:
            raise HeadError(f"temperature must be > 0, got {temperature}")
        self.gate_pattern: tuple[int, ...] = tuple(pattern)
        self.objective_names: tuple[str, ...] = (
            tuple(objective_names) if objective_names is not None
            else tuple(f"objective_{i}" for i in range(n_objectives))
        )
        if len(self.objective_names) != n_objectives:
            raise HeadError(f"{len(self.objective_names)} objective names for {n_objectives} "
                            "objectives")
        self.regression_layer = nn.Linear(d_model, n_objectives, bias=False)
        self.gating = _GatingNetwork(d_model, n_objectives, hidden_dim, n_hidden, gate_bias,
                                     temperature, logit_scale)
        self.reward_transform_matrix = nn.Parameter(torch.eye(n_objectives), requires_grad=False)
        self.hook_prompt = HookPoint()  # [batch, d_model]
        self.hook_objectives = HookPoint()  # [batch, k]
        self.hook_gate = HookPoint()  # [batch, k]

    @property
    def n_objectives(self) -> int:
        return self.regression_layer.out_features

    def n_outputs(self, d_model: int) -> int:
        return 1

    def _score(self, objectives: Tensor, gate: Tensor) -> Tensor:
        transformed = objectives @ self.reward_transform_matrix
        return (gate * transformed).sum(-1, keepdim=True)

    def compute(self, pooled, unembed, prompt=None):
        if prompt is None:
            raise HeadError(
                "a gated head needs the state at the end of the prompt as well as the pooled "
                "state; this path runs the scoring token alone. Run the model on token ids."
            )
        return self._score(self.regression_layer(pooled), self.gating(prompt))

    def forward(self, pooled, unembed, prompt=None):
        if prompt is None:
            self.compute(pooled, unembed, None)  # the error
        pooled = self.hook_pooled(pooled)
        prompt = self.hook_prompt(prompt)
        objectives = self.hook_objectives(self.regression_layer(pooled))
        gate = self.hook_gate(self.gating(prompt))
        return self.hook_reward(self._score(objectives, gate))

    def prompt_end(self, tokens, attention_mask, pool_index):
        """First token of the last occurrence of ``gate_pattern`` among each row's real tokens up
        to its scoring token (ArmoRM's ``find_token_for_gating`` rule)."""
        n = len(self.gate_pattern)
        batch, n_pos = tokens.shape
        if n > n_pos:
            raise InvalidInputError(
                f"the gate pattern {list(self.gate_pattern)} ({n} tokens) is longer than the "
                f"sequences ({n_pos} tokens): no row marks the end of its prompt"
            )
        pattern = torch.as_tensor(self.gate_pattern, device=tokens.device)
        windows = tokens.unfold(1, n, 1)  # [batch, n_pos - n + 1, n]
        match = (windows == pattern).all(-1)
        starts = torch.arange(n_pos - n + 1, device=tokens.device)
        match &= (starts[None] + n - 1) <= pool_index.to(tokens.device)[:, None]
        if attention_mask is not None:
            real = attention_mask.bool().unfold(1, n, 1).all(-1)
            match &= real
        found = match.any(-1)
        if not bool(found.all()):
            bad = torch.nonzero(~found).flatten().tolist()
            raise InvalidInputError(
                f"rows {bad} do not contain the gate pattern {list(self.gate_pattern)} (the "
                "tokens that end the prompt) before their scoring token, so the gated head has "
                "no prompt state to gate on. Format the texts with the model's chat template "
                "(a prompt turn, then the response), or build the GatedHead with the pattern "
                "your template uses."
            )
        return (starts[None] * match).argmax(-1)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], gate_pattern: Sequence[int], *,
                        prefix: str = "", temperature: float = 10.0,
                        objective_names: Sequence[str] | None = None) -> "GatedHead":
        """A gated head from ArmoRM's layout (``regression_layer.weight``,
        ``gating.layers.{i}.weight/bias``, ``gating.logit_scale``, ``reward_transform_matrix``);
        ``temperature`` is the checkpoint config's ``gating_temperature``."""
        try:
            reg = state[prefix + "regression_layer.weight"]
            n_layers = 1 + max(int(k[len(prefix + "gating.layers."):].split(".")[0])
                               for k in state if k.startswith(prefix + "gating.layers."))
        except (KeyError, ValueError) as err:
            raise HeadError(
                f"no ArmoRM gated head in this state dict (prefix {prefix!r}): expected "
                "regression_layer.weight and gating.layers.<i>.weight"
            ) from err
        first = state[f"{prefix}gating.layers.0.weight"]
        last_bias = f"{prefix}gating.layers.{n_layers - 1}.bias" in state
        head = cls(reg.shape[1], reg.shape[0], gate_pattern, hidden_dim=first.shape[0],
                   n_hidden=n_layers - 1, temperature=temperature, gate_bias=last_bias,
                   objective_names=objective_names)
        mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and (
            k[len(prefix):].startswith(("regression_layer.", "gating."))
            or k[len(prefix):] == "reward_transform_matrix")}
        missing, unexpected = head.load_state_dict(mine, strict=False)
        if missing or unexpected:
            raise HeadError(f"gated head state does not fit: missing {missing}, unexpected "
                            f"{unexpected}")
        return head


class CustomHead(RewardHead):
    """A user's module mapping the pooled state ``[batch, d_model]`` to rewards
    ``[batch, n_rewards]`` (a ``[batch]`` output is read as one reward), as ``reward_head.module``."""

    kind = "custom"
    is_linear = False

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def n_outputs(self, d_model: int) -> int:
        param = next(self.module.parameters(), None)
        probe = torch.zeros(2, d_model, dtype=param.dtype if param is not None else torch.float32,
                            device=param.device if param is not None else None)
        try:
            with torch.no_grad():
                out = self.module(probe)
        except Exception as err:  # noqa: BLE001 - the user's module, with its cause
            raise HeadError(
                f"the head module {type(self.module).__name__} cannot take the pooled state "
                f"[batch, d_model={d_model}]: {type(err).__name__}: {err}"
            ) from err
        if out.ndim == 1 and out.shape[0] == 2:
            return 1
        if out.ndim != 2 or out.shape[0] != 2:
            raise HeadError(
                f"the head module {type(self.module).__name__} maps [2, {d_model}] to shape "
                f"{tuple(out.shape)}; a head must return [batch, n_rewards] or [batch]"
            )
        return out.shape[1]

    def compute(self, pooled, unembed, prompt=None):
        out = self.module(pooled)
        return out[..., None] if out.shape == pooled.shape[:-1] else out


HEAD_KINDS: Mapping[str, type[RewardHead]] = {
    cls.kind: cls for cls in (RewardHead, MLPHead, GatedHead, CustomHead)
}
"""The head kinds by name."""


def head_in_dtype(head: RewardHead, unembed: nn.Module,
                  dtype: torch.dtype) -> tuple[RewardHead, nn.Module]:
    """The head (and the ``unembed`` a linear head reads) with parameters in ``dtype``: the
    modules themselves when they already are, else copies (a half-precision model's read-outs are
    computed in float32; a head is small)."""
    import copy

    def cast(module: nn.Module) -> nn.Module:
        params = list(module.parameters())
        if all(p.dtype == dtype for p in params if p.is_floating_point()):
            return module
        return copy.deepcopy(module).to(dtype)

    return cast(head), cast(unembed)


def as_reward_head(head: nn.Module) -> RewardHead:
    """A :class:`RewardHead` of one of the :data:`HEAD_KINDS`; any other module as a custom head."""
    if isinstance(head, RewardHead):
        return head
    if isinstance(head, nn.Module):
        return CustomHead(head)
    raise HeadError(
        f"head must be an nn.Module mapping [batch, d_model] to rewards (or one of "
        f"{', '.join(c.__name__ for c in HEAD_KINDS.values())}), got {type(head).__name__}"
    )
