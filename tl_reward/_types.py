"""Dimension glossary and shared tensor aliases.

Dimension names used in every jaxtyping annotation of the package:

- ``batch``: sequences (or pairs) in a batch
- ``pos``: token positions
- ``d_model``: residual stream width
- ``layer``: layers (and the embedding read-out, where a lens includes it)
- ``head``: attention heads of a layer; ``d_head``: their width
- ``d_mlp``: MLP hidden width
- ``d_vocab``: vocabulary (logits of a causal LM)
- ``n_rewards``: outputs of the reward head (1 for a scalar reward model)
- ``d_sae``: SAE dictionary size
- ``pair``: preference pairs
- ``unit``: CART circuit units (MLP neurons, attention heads, SAE features); ``circuit``: CART
  circuits; ``d_circuit``: a circuit's raw activation width (one per neuron or feature,
  ``d_head`` per head)
"""

from jaxtyping import Float, Int
from torch import Tensor

Tokens = Int[Tensor, "batch pos"]
Mask = Int[Tensor, "batch pos"]
PooledIndex = Int[Tensor, "batch"]
Residual = Float[Tensor, "batch pos d_model"]
RewardDirection = Float[Tensor, "d_model"]
