"""Causal tools: what changes the reward when an activation is replaced.

``patching`` (exact activation patching, batched and started at the patched layer),
``path_patching``, ``atp`` (attribution patching, its linear estimate), ``agreement`` (attribution
against patching), ``divergence`` (patching restricted to natural activations), ``gated`` (a gated
head's objectives and gate, the gate as a patch), ``step_analysis`` (a process reward's steps or
their aggregate as the metric). Public names are re-exported by ``tl_reward``.
"""
