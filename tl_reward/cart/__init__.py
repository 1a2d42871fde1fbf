"""CART: circuit discovery and vulnerability assessment for reward models (arXiv 2509.24713).

- :mod:`tl_reward.cart.metrics`: the paper's equations (1)-(9) as pure typed functions.
- :func:`discover`: differential activation (streamed), coherence, grouping into circuits,
  causal validation; :func:`assess`: consistency, sensitivity, coverage, vulnerability.
- :mod:`tl_reward.cart.units`: units (neurons, heads, SAE features), circuits, reading them and
  intervening on them through TransformerLens hooks.
"""

from .._stats import adjust_p_values as adjust_p_values
from .assessment import Assessment as Assessment
from .assessment import assess as assess
from .discovery import Discovery as Discovery
from .discovery import UnitStatistics as UnitStatistics
from .discovery import Validation as Validation
from .discovery import activation_statistics as activation_statistics
from .discovery import discover as discover
from .discovery import group_circuits as group_circuits
from .discovery import split_texts as split_texts
from .discovery import validate_circuits as validate_circuits
from .metrics import TailBound as TailBound
from .metrics import binned_mutual_information as binned_mutual_information
from .metrics import circuit_activation as circuit_activation
from .metrics import circuit_divergence as circuit_divergence
from .metrics import coherence as coherence
from .metrics import coherence_from_covariance as coherence_from_covariance
from .metrics import consistency as consistency
from .metrics import coverage as coverage
from .metrics import differential_activation as differential_activation
from .metrics import gaussian_mi_from_covariance as gaussian_mi_from_covariance
from .metrics import gaussian_mutual_information as gaussian_mutual_information
from .metrics import grouped_consistency as grouped_consistency
from .metrics import ksg_mutual_information as ksg_mutual_information
from .metrics import max_perturbation_effect as max_perturbation_effect
from .metrics import mutual_information as mutual_information
from .metrics import reward_decomposition as reward_decomposition
from .metrics import sensitivity_first_order as sensitivity_first_order
from .metrics import sensitivity_pgd as sensitivity_pgd
from .metrics import tail_generalization_bound as tail_generalization_bound
from .metrics import tau_specialization as tau_specialization
from .metrics import vulnerability as vulnerability
from .streaming import Reservoir as Reservoir
from .streaming import RunningMoments as RunningMoments
from .units import Circuit as Circuit
from .units import Unit as Unit
from .units import all_units as all_units
from .units import circuit_activations as circuit_activations
from .units import feature as feature
from .units import head as head
from .units import neuron as neuron
from .units import unit_activations as unit_activations
