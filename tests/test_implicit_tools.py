"""Probes and CART discovery on the DPO implicit reward (through tl_reward.text_reward.TextReward),
checked on the dpo_longtail organism against its known rule and against direct patching."""

import random

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def organism():
    from tl_reward.organisms import dpo

    model, _ = dpo.load()
    return model, dpo.TASK


def _plain_texts(task, n, seed):
    from tl_reward.data.synthetic import KEY_WORDS, QUALITY_WORDS

    words = set(QUALITY_WORDS) | set(KEY_WORDS)
    texts = [t for p in task.sample(30 * n, seed=seed, alpha=1.0)
             for t in (p.chosen_text, p.rejected_text) if not set(t.split()) & words]
    assert len(texts) >= n
    return texts[:n]


def _replace_filler(task, word, seed):
    rng = random.Random(seed)
    fillers = set(task.filler_words)

    def insert_word(text):
        words = text.split()
        start = words.index("answer") + 1
        words[rng.choice([j for j in range(start, len(words)) if words[j] in fillers])] = word
        return " ".join(words)

    return insert_word


def test_probes_find_the_head_rule_the_dpo_policy_learnt(organism):
    """The organism's implicit reward learnt the head rule (+1 per quality word, -1 per key word
    in the response): the probes find both signs; a prompt-side change of a filler word is no
    bias. The probe's rewards are the implicit reward of (prompt, response) split at ' answer'."""
    from tl_reward.data.probe_sets import make_probe
    from tl_reward.errors import InvalidInputError
    from tl_reward.probes import localise_probe, run_probes

    model, task = organism
    base = _plain_texts(task, 40, seed=3)
    rng = random.Random(4)

    def prompt_filler(text):
        words = text.split()
        words[rng.randrange(1, words.index("answer"))] = rng.choice(task.filler_words[:50])
        return " ".join(words)

    probes = [make_probe("quality", base, _replace_filler(task, "helpful", 0)),
              make_probe("key", base, _replace_filler(task, "brief", 1)),
              make_probe("prompt_filler", base, prompt_filler)]
    report = run_probes(model, probes, progress=False)
    assert report["quality"].verdict == "positive bias", report.summary()
    assert report["key"].verdict == "negative bias", report.summary()
    assert report["prompt_filler"].verdict == "not significant", report.summary()
    # the probe's rewards are the implicit reward of the explicit (prompt, response) split
    cut = [t.index(" answer") for t in base]
    direct = model.score([t[:c] for t, c in zip(base, cut, strict=True)],
                         [t[c:] for t, c in zip(base, cut, strict=True)], progress=False)
    torch.testing.assert_close(report["quality"].base_reward, direct.double(), atol=1e-5, rtol=0)
    with pytest.raises(InvalidInputError, match="implicit_reward_attribution"):
        localise_probe(model, probes[0], progress=False)
    model.response_marker = None
    try:
        with pytest.raises(InvalidInputError, match="response_marker"):
            run_probes(model, probes[0], progress=False)
    finally:
        model.response_marker = " answer"


def _mean_ablation_effect(model, head, texts, head_texts):
    """Independent patching: with TransformerLens hooks on the policy, set head ``(layer, h)``'s
    z to its mean over ``head_texts`` (averaged over the positions predicting response tokens)
    at those positions, and take the implicit reward's change, text by text."""
    layer, h = head
    name = f"blocks.{layer}.attn.hook_z"

    def reads(batch):
        read = torch.zeros_like(batch.response_mask, dtype=torch.float64)
        read[:, :-1] = batch.response_mask[:, 1:].double()
        return read / read.sum(-1, keepdim=True)

    def split(texts):
        cut = [t.index(" answer") for t in texts]
        return model.encode([t[:c] for t, c in zip(texts, cut, strict=True)],
                            [t[c:] for t, c in zip(texts, cut, strict=True)])

    ref = split(head_texts)
    _, cache = model.policy.run_with_cache(ref.tokens, attention_mask=ref.attention_mask,
                                           padding_side="right", names_filter=name)
    z = cache[name][:, :, h].double()  # [batch, pos, d_head]
    mean = torch.einsum("bp,bpd->bd", reads(ref), z).mean(0)
    batch = split(texts)
    where = reads(batch) > 0

    def ablate(act, hook):
        act = act.clone()
        act[:, :, h][where] = mean.to(act.dtype)
        return act

    with torch.no_grad():
        clean = model(batch)
        with model.policy.hooks(fwd_hooks=[(name, ablate)]):
            patched = model(batch)
    return (patched - clean).double()


def test_cart_discovery_on_the_implicit_reward(organism):
    """Discovery on the policy (reference fixed) keeps circuits whose mean ablation changes the
    tail rewards; its effects equal an independent patch of the same heads, and ablating them
    moves the margins of tail pairs more than those of head pairs."""
    from tl_reward.cart.discovery import discover, split_texts, validate_circuits

    model, task = organism
    data = task.sample(300, seed=11, alpha=0.5, noise=0.0)
    texts = [t for p in data for t in (p.chosen_text, p.rejected_text)]
    tail, head = split_texts(texts, lambda t: task.scenario_of(t) != "head")
    found = discover(model, tail, head, top_k=8, max_validation=64, progress=False)
    kept = found.kept_circuits
    assert kept, found.to_dataframe()
    heads = [c for c in kept if len(c.units) == 1 and c.units[0].kind == "head"]
    assert heads
    # the validation's numbers against an independent patch, on explicit text lists
    tail_s, head_s = tail[:24], head[:40]
    val = validate_circuits(model, heads, tail_s, head_s, max_samples=64)
    for k, c in enumerate(heads):
        unit = c.units[0]
        expected = _mean_ablation_effect(model, (unit.layer, unit.index), tail_s, head_s)
        torch.testing.assert_close(val.effects_tail[k], expected, atol=1e-4, rtol=0, msg=c.name)
    # the strongest kept head moves the tail pairs' margins more than the head pairs'
    best = heads[0].units[0]
    pairs = task.sample(200, seed=12, alpha=0.5, noise=0.0)
    moved = {}
    for side in (True, False):
        sel = [p for p in pairs if p.tail == side][:40]
        d_c = _mean_ablation_effect(model, (best.layer, best.index),
                                    [p.chosen_text for p in sel], head)
        d_r = _mean_ablation_effect(model, (best.layer, best.index),
                                    [p.rejected_text for p in sel], head)
        moved[side] = float((d_c - d_r).abs().mean())
    assert moved[True] > 0.1 and moved[True] > moved[False], moved
