"""Reference implementations of published nonlinear reward heads, in plain PyTorch on top of the
HF trunk, written from the published modelling code (read, not copied) to test tl_reward against.

- GRM (Ray2333/GRM-*): ``ValueHead.summary`` = n x (Linear(., neurons), ReLU) + Linear(., 1) on
  the final hidden state; the reward at the last token by the attention mask (left padding: the
  last position).
- ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1, ``modeling_custom.py``): ``regression_layer`` (no bias)
  at the pooled token, ``gating`` (ReLU MLP, softmax(x / T) * logit_scale) at the first token of
  the last occurrence of a token pattern, score = sum(gate * (rewards @ reward_transform_matrix)).
"""

import torch
import transformers as T
from helpers import randomize_
from torch import nn


class GRMValueHead(nn.Module):
    def __init__(self, hidden: int, neurons: int, n_layers: int, act=nn.ReLU) -> None:
        super().__init__()
        mods, width = [], hidden
        for _ in range(n_layers):
            mods += [nn.Linear(width, neurons), act()]
            width = neurons
        mods.append(nn.Linear(width, 1))
        self.summary = nn.Sequential(*mods)

    def forward(self, h):
        return self.summary(h)


class GRMReference(T.PreTrainedModel):
    base_model_prefix = "model"

    def __init__(self, config, neurons: int = 24, n_layers: int = 1, act=nn.ReLU):
        super().__init__(config)
        self.model = T.AutoModel.from_config(config, attn_implementation="eager")
        self.v_head = GRMValueHead(config.hidden_size, neurons, n_layers, act)

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if torch.any(attention_mask[:, 0] == 0):
            last = torch.full((len(hidden),), attention_mask.shape[-1] - 1)
        else:
            last = attention_mask.sum(-1) - 1
        return self.v_head(hidden).squeeze(-1)[torch.arange(len(hidden)), last]


class Gating(nn.Module):
    def __init__(self, d_in, k, hidden, n_hidden, temperature, logit_scale):
        super().__init__()
        self.temperature = temperature
        self.logit_scale = nn.Parameter(torch.ones(1) * logit_scale)
        widths = [d_in] + [hidden] * n_hidden
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)]
                                    + [nn.Linear(widths[-1], k)])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return torch.softmax(x / self.temperature, dim=1) * self.logit_scale[0]


class ArmoRMReference(T.PreTrainedModel):
    base_model_prefix = "model"

    def __init__(self, config, pattern, k=3, hidden=16, n_hidden=2, temperature=0.7):
        super().__init__(config)
        self.pattern = list(pattern)
        self.model = T.AutoModel.from_config(config, attn_implementation="eager")
        self.regression_layer = nn.Linear(config.hidden_size, k, bias=False)
        self.gating = Gating(config.hidden_size, k, hidden, n_hidden, temperature, 1.0)
        self.reward_transform_matrix = nn.Parameter(torch.eye(k), requires_grad=False)

    def gate_position(self, ids):
        n = len(self.pattern)
        for j in range(len(ids) - n, -1, -1):
            if ids[j:j + n] == self.pattern:
                return j
        raise ValueError("Token pattern not found in the list.")

    def forward(self, input_ids):
        """One unpadded sequence per call (the truth for parity)."""
        hidden = self.model(input_ids=input_ids).last_hidden_state
        rows = torch.arange(len(hidden))
        rewards = self.regression_layer(hidden[rows, -1])
        gate_pos = [self.gate_position(ids.tolist()) for ids in input_ids]
        gate = self.gating(hidden[rows, gate_pos])
        score = (gate * (rewards @ self.reward_transform_matrix)).sum(1)
        return score, rewards, gate


def randomized(ref: nn.Module, seed: int) -> nn.Module:
    """Noise in the trunk (norm weights included) and the head, every scale non-trivial."""
    randomize_(ref.model, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.startswith("model."):
                continue
            p.copy_(0.5 * torch.randn(p.shape, generator=gen) + (1.0 if "scale" in name else 0))
        if hasattr(ref, "reward_transform_matrix"):
            k = ref.reward_transform_matrix.shape[0]
            ref.reward_transform_matrix.copy_(torch.eye(k) + 0.3 * torch.randn(k, k, generator=gen))
    return ref.eval()


class PRMReference(T.PreTrainedModel):
    """Qwen2.5-Math-PRM: ``score`` = Linear(h, h), ReLU, Linear(h, 2) at every token; a step's
    score is softmax(logits)[..., 1] at each step-separator token."""

    base_model_prefix = "model"

    def __init__(self, config, separator: int):
        super().__init__(config)
        self.separator = separator
        self.model = T.AutoModel.from_config(config, attn_implementation="eager")
        h = config.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))

    def forward(self, input_ids):
        """One unpadded sequence: the positive probability at each separator."""
        logits = self.score(self.model(input_ids=input_ids).last_hidden_state)[0]
        return logits.softmax(-1)[input_ids[0] == self.separator, 1]


class INFORMReference(T.PreTrainedModel):
    """INF-ORM-Llama3.1-70B: ``score`` = Linear(h, h), ReLU, Linear(h, 1) on every token, the
    reward at the last token (``argmax(ids == pad) - 1``: right padding, no pad in the text)."""

    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = T.AutoModel.from_config(config, attn_implementation="eager")
        h = config.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))

    def forward(self, input_ids):
        logits = self.score(self.model(input_ids=input_ids).last_hidden_state)
        last = (torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1) % input_ids.shape[-1]
        return logits[torch.arange(len(input_ids)), last][:, 0]
