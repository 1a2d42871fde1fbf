"""Build notebooks/05_sae.ipynb (stored without outputs, like the other notebooks).

    .venv/bin/python scripts/build_notebook_05.py            # write the notebook
    .venv/bin/python scripts/build_notebook_05.py --execute  # and execute it once to check it
"""

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

PATH = Path(__file__).resolve().parent.parent / "notebooks" / "05_sae.ipynb"

CELLS = [
    ("md", """# SAE features of a reward model

sae-lens has the sparse autoencoders (standard, TopK, JumpReLU, ...), the way they are spliced into a
TransformerLens model and the training runner; it has no attribution and no notion of a reward.
`tl_reward.sae` joins the two: train an SAE on a reward model's activations with sae-lens's own runner,
splice it in with sae-lens's own mechanics (error term kept, so the forward is unchanged), and attribute
the reward and each preference pair's margin to its features:

- **direct** (SAEs on the residual stream; the default on the final residual and on the last MLP's
  output): activation at the scoring token x (decoder row . effective reward direction / the final norm's
  cached scale). Exact: the rows add up to the reward.
- **gradient** (any hook; the default elsewhere): gradient x activation through the spliced SAE.
- **integrated** (pairs): integrated gradients from the rejected run's SAE activations to the chosen
  run's; the rows add up to the margin.

The **planted** organism has a known mechanism, so we can check what the tools find."""),
    ("code", """import tempfile
from pathlib import Path

import pandas as pd
import torch

import tl_reward.sae as S
from tl_reward import organisms
from tl_reward.organisms import planted as P

torch.set_num_threads(2)
model, tokenizer, data = organisms.load('planted')
print(data)
pd.DataFrame([vars(c) for c in organisms.planted_components()])[['label', 'circuit', 'role']]"""),
    ("md", """## Train an SAE with sae-lens's runner

The trigger circuit ends in neuron `L1N11`, which writes along `w_r` into the final residual stream at the
scoring token. `train_sae` builds a `LanguageModelSAERunnerConfig` for the hook and runs sae-lens's
`LanguageModelSAETrainingRunner` with `override_model` (a thin adapter: sae-lens calls
`run_with_cache(..., prepend_bos=False)`) and `override_dataset` (the texts tokenized by the reward model,
one text per row, padding excluded from training). A few seconds on 2 CPU cores.

The standard SAE uses an L_p penalty with p = 0.5: with L1 (p = 1) the rare, large trigger write was split
across several duplicate features (see `help(S.sae_training_config)`)."""),
    ("code", """out = Path(tempfile.mkdtemp()) / 'planted_final_resid'
hook = 'blocks.1.hook_resid_post'
sae = S.train_sae(model, data, hook, d_sae=128, output_path=out, progress=False)
print(type(sae).__name__, sorted(p.name for p in out.iterdir()))
meta = sae.cfg.metadata
{k: meta[k] for k in ('hook_name', 'model_class_name', 'l0', 'num_dead_features', 'tl_reward')}"""),
    ("md", """## Splicing: the forward is unchanged

`attach_saes` wraps the SAE in sae-lens's own wrapper module (the one `HookedSAETransformer.add_sae` uses) and
sets it at the hook point. With the error term kept the rewards are the model's; without it the activation is
replaced by the reconstruction. The SAE's hook points appear under the hook's name."""),
    ("code", """trig = data.by_scenario('trigger')[:100]
tokens, mask = model.pad(model.tokenize(trig.chosen_texts))
with torch.no_grad():
    plain = model(tokens, attention_mask=mask)
    with S.attach_saes(model, sae):
        kept, cache = model.run_with_cache(tokens, attention_mask=mask)
    with S.attach_saes(model, sae, use_error_term=False):
        replaced = model(tokens, attention_mask=mask)
print('with the error term:    max |reward change| =', float((kept - plain).abs().max()))
print('without the error term: max |reward change| =', float((replaced - plain).abs().max()))
[name for name in cache if name.startswith(hook)]"""),
    ("md", """## Which features carry the margin of the trigger pairs?

A trigger pair is the same text with and without the word `urgent` (the organism's stand-in for a tail
scenario). Direct attribution decomposes each pair's margin exactly into the features, the SAE's error term,
its decoder bias and the rest of the residual (nothing, on the final residual)."""),
    ("code", """attr = S.sae_pair_attribution(model, sae, trig.chosen_texts, trig.rejected_texts, progress=False)
margin = model.score_pairs(trig.chosen_texts, trig.rejected_texts, progress=False).margin
print('max |sum of rows - margin| =', float((attr.values.sum(0) - margin).abs().max()))
attr.top(5)"""),
    ("code", """attr.plot(k=10)"""),
    ("md", """The first feature should be the trigger circuit's write: does its decoder point where `L1N11` writes, and does
it fire on the trigger texts only?"""),
    ("code", """f = int(attr.top(1).feature[0])
layer, neuron = P.TRIGGER_NEURON
w_out = model.blocks[layer].mlp.W_out[neuron]
cos = float(torch.cosine_similarity(sae.W_dec[f].detach(), w_out.detach(), dim=0))
summary = S.sae_dataset_features(model, sae, data[:200], progress=False)
fires = {s: {'chosen': float((summary.chosen_max[f][summary.select(s)] > 0).float().mean()),
             'rejected': float((summary.rejected_max[f][summary.select(s)] > 0).float().mean())}
         for s in ('trigger', 'quality')}
print(f'feature {f}: rank {attr.rank(f)} in margin attribution, cosine with W_out[L1N11] = {cos:.3f}')
pd.DataFrame(fires)"""),
    ("md", """Dataset views: features specific to the trigger scenario, features that separate the chosen from the rejected
response (paired t-test), and the texts where feature `f` fires most, tokens shaded by its activation."""),
    ("code", """summary.scenario_features('trigger', k=5)"""),
    ("code", """summary.separating_features(k=5)"""),
    ("code", """examples = summary.top_examples(f, k=4)
examples"""),
    ("code", """examples.plot()"""),
    ("md", """## Causal check: edit the features

Each attribution predicts a different intervention, so each gets its own check:

- direct attribution is each feature's share of each side's reward: `sae_pair_feature_ablation` zeroes the
  feature at every position on both sides (the error term, computed by sae-lens from the unedited activation,
  stays) and measures the margin; the prediction is minus the feature's contribution, with the final norm
  frozen at its cached scale;
- integrated gradients attribute the move from the rejected to the chosen activations: `sae_feature_ablation`
  with `mode='patch'` writes the chosen run's activation of the feature into the rejected run and measures the
  rejected reward."""),
    ("code", """second = int(attr.top(2).feature[1])
both = [f, second]
zero = S.sae_pair_feature_ablation(model, sae, trig.chosen_texts, trig.rejected_texts,
                                   features=both, progress=False)
integrated = S.sae_pair_attribution(model, sae, trig.chosen_texts, trig.rejected_texts,
                                    method='integrated', steps=16, progress=False)
patch = S.sae_feature_ablation(model, sae, trig.rejected_texts, features=both, mode='patch',
                               source=trig.chosen_texts, progress=False)
pd.concat([
    zero.agreement().assign(check='zero both sides vs direct'),
    patch.agreement(predicted=integrated.feature_values()[both]).assign(
        check='patch chosen into rejected vs integrated'),
])[['check', 'feature', 'measured', 'predicted', 'ratio', 'pearson_r']]"""),
    ("code", """zero.plot()"""),
    ("md", """Direct attribution freezes the final RMSNorm at its cached scale. The trigger write is large enough to dominate
that norm (the reward saturates near sqrt(d_model)), so removing it changes the reward by less than the frozen
read-out says. Integrated gradients follow the norm along the path from the rejected to the chosen activations
and predict the trigger feature's patch closely.

The second feature shows the limit of any additive attribution here: it is a quality feature, weaker in the
chosen text. Patched alone into the rejected run (no trigger write, norm not saturated) it lowers the reward;
along the joint path most of its change happens while the trigger write already saturates the norm, so
integrated gradients give it a small share of the other sign. The features interact through the norm, and
the table shows it rather than hiding it."""),
    ("md", """## An earlier hook on the long-tail organism

`longtail` was trained with plain ERM and gets every tail pair wrong. An SAE on the residual stream after layer 0
is upstream of the last layer, so its features act through it: attribution here is gradient x activation (or
integrated gradients for pairs), with the SAE's error term as its own row."""),
    ("code", """lt_model, _, lt_data = organisms.load('longtail')
lt_sae = S.train_sae(lt_model, lt_data[:600], 'blocks.0.hook_resid_post', d_sae=128,
                     l1_coefficient=0.3, progress=False)
held_out = lt_data[600:760]
lt_summary = S.sae_dataset_features(lt_model, lt_sae, held_out, method='integrated', steps=4,
                                    progress=False)
print(lt_summary.method, '| tail pairs:', int(lt_summary.select('tail').sum()))
lt_summary.top_features(5, scenario='tail')"""),
    ("code", """lt_summary.scenario_features('tail', k=5)"""),
    ("code", """tail_feature = int(lt_summary.scenario_features('tail', k=1).feature[0])
lt_summary.top_examples(tail_feature, k=3, scenario='tail')"""),
    ("code", """lt_summary.plot(k=10)"""),
    ("md", """The gradient method gives the same kind of table for single texts; its rows (features, error, decoder bias) add up
to the hook's own gradient x activation:"""),
    ("code", """grad = S.sae_reward_attribution(lt_model, lt_sae, held_out.tail().chosen_texts[:32], progress=False)
print(grad.methods, 'max |rows - totals| =', float(grad.completeness().abs().max()))
grad.top(5, kinds=('feature', 'error', 'decoder_bias'))"""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    return nb


def main(argv: list[str]) -> None:
    nb = build()
    if "--execute" in argv:
        from nbclient import NotebookClient

        executed = nbformat.from_dict(nb)
        NotebookClient(executed, timeout=600, kernel_name="python3", record_timing=True,
                       resources={"metadata": {"path": str(PATH.parent)}}).execute()
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
                  if o.get("output_type") == "error"]
        if errors:
            raise SystemExit(f"notebook failed: {errors}")
        if "--keep-outputs" in argv:
            nbformat.write(executed, PATH.with_suffix(".executed.ipynb"))
    nbformat.write(nb, PATH)
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main(sys.argv[1:])
