"""Observational tools: what the reward reads, without intervening.

``lens`` (reward lens per layer), ``tuned_lens`` (trained translators), ``attribution`` (direct
reward attribution to components, heads, neurons, positions: exact for a linear head),
``nonlinear_attribution`` (integrated gradients through any head, the gate of a gated head),
``compare`` (the same texts read by several reward models or reward terms), ``concepts``
(concept directions and their dose-response). Public names are re-exported by ``tl_reward``.
"""
