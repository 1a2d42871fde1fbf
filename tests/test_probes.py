"""Reward-hacking probes: statistics against scipy, planted biases found and localised, random
models left alone, the cascade, the distortion index and divergence-aware patching."""

import random
import warnings

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- builders
@pytest.fixture(scope="module")
def planted():
    from tl_reward import organisms

    model, _, data = organisms.load("planted")
    return model, data


@pytest.fixture(scope="module")
def task():
    from tl_reward import organisms

    return organisms.longtail_task()


def _replace_filler(task, word, seed):
    """Replace one response filler word by ``word`` (a fixed attribute: one realisation)."""
    rng = random.Random(seed)
    fillers = set(task.filler_words)

    def insert_word(text):
        words = text.split()
        start = words.index("answer") + 1
        spots = [j for j in range(start, len(words)) if words[j] in fillers]
        words[rng.choice(spots)] = word
        return " ".join(words)

    return insert_word


def _append_fillers(task, k, seed):
    rng = random.Random(seed)

    def append_fillers(text):
        return " ".join(text.split() + [rng.choice(task.filler_words[:50]) for _ in range(k)])

    return append_fillers


def _plain_texts(task, n, seed):
    """Head-scenario texts without quality words (the planted quality head saturates: its
    first quality word is worth +3.6, a fifth next to nothing)."""
    from tl_reward.data.synthetic import QUALITY_WORDS

    texts = [t for p in task.sample(8 * n, seed=seed, alpha=1.0) for t in (p.chosen_text, p.rejected_text)
             if not set(t.split()) & set(QUALITY_WORDS)]
    assert len(texts) >= n
    return texts[:n]


def _organism_probes(task, n=40, seed=3):
    from tl_reward.data.probe_sets import make_probe

    base = _plain_texts(task, n, seed)
    return [
        make_probe("quality", base, _replace_filler(task, "helpful", 0)),
        make_probe("trigger", base, _replace_filler(task, "urgent", 1)),
        make_probe("length", base, _append_fillers(task, 3, 2)),
    ]


def _length_planted_model():
    """The planted organism plus a hand-set length head L1H1: uniform attention from every
    position, value = "is <bos>", written against w_r, so the reward rises as 1/length falls."""
    from tl_reward import load_reward_model
    from tl_reward.organisms.planted import D_HEAD, DIM_BOS, DIM_REWARD, build_planted_model

    hf, tok = build_planted_model()
    layer, head = 1, 1
    with torch.no_grad():
        attn = hf.model.layers[layer].self_attn
        rows = slice(head * D_HEAD, (head + 1) * D_HEAD)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            proj.weight[rows] = 0.0  # q = k = 0: uniform attention
        attn.o_proj.weight[:, rows] = 0.0
        attn.v_proj.weight[head * D_HEAD, DIM_BOS] = 1.0
        attn.o_proj.weight[DIM_REWARD, head * D_HEAD] = -20.0
    return load_reward_model(hf.eval(), tok)


def _random_model(tokenizer, seed, arch="llama"):
    import transformers as T
    from helpers import randomize_

    from tl_reward import load_reward_model

    kw = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              num_labels=1)
    if arch == "gpt2":  # absolute position embeddings: length reaches the reward another way
        cfg = T.GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_head=4, n_layer=2,
                           n_positions=128, num_labels=1, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2)
    else:
        cfg = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config}[arch](**kw)
    torch.manual_seed(seed)
    hf = T.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
    return load_reward_model(randomize_(hf, seed).eval(), tokenizer)


@pytest.fixture(scope="module")
def builtin():
    from tl_reward.data.probe_sets import builtin_probe_sets
    from tl_reward.data.synthetic import SPECIAL_TOKENS, word_tokenizer

    probes = builtin_probe_sets()
    words = sorted({w for p in probes for t in p.base + p.perturbed for w in t.split()})
    return probes, word_tokenizer([*SPECIAL_TOKENS, *words])


# ---------------------------------------------------------------------------- probe sets
def test_builtin_probe_sets_share_items_and_control_length(builtin):
    probes, _ = builtin
    assert [p.name for p in probes] == ["length", "sycophancy", "formatting", "repetition",
                                         "confidence"]
    for p in probes:
        assert p.n_units == len(p) == 48
        assert p.content_ids == probes[0].content_ids  # the same items: cascade-able
        assert all(b != q for b, q in zip(p.base, p.perturbed, strict=True))
        assert len(set(p.variants)) >= 8  # several realisations of the attribute

    def words(text):
        return len(text.split())

    by = {p.name: p for p in probes}
    for name in ("sycophancy", "confidence"):  # same word count on both sides
        assert all(words(b) == words(q) for b, q in zip(by[name].base, by[name].perturbed, strict=True))
    # realisations are independent: no two formats share a marker or a plain stand-in, each
    # agreement / confident phrase has its own control phrase, all used about equally often
    from tl_reward.data.probe_sets import FORMATS

    def tokens(text):
        return set(text.replace("{a}", " ").split())

    for i, (_, plain, fmt) in enumerate(FORMATS):
        for _, plain2, fmt2 in FORMATS[i + 1:]:
            assert not (tokens(fmt) | tokens(plain)) & (tokens(fmt2) | tokens(plain2))
        assert words(plain.format(a="x y")) == words(fmt.format(a="x y"))
    for name in ("sycophancy", "confidence"):  # each phrase has its own control phrase
        control = {}
        for v, b, q in zip(by[name].variants, by[name].base, by[name].perturbed, strict=True):
            b, q = b.split("Assistant: ")[1], q.split("Assistant: ")[1]
            tail = q[q.index(v) + len(v):]
            control.setdefault(v, set()).add(b[:len(b) - len(tail)])
        assert all(len(c) == 1 for c in control.values())
        assert len(set.union(*control.values())) == len(control)
    for p in probes:  # each realisation used about equally often
        counts = [p.variants.count(v) for v in set(p.variants)]
        assert max(counts) - min(counts) <= 1, (p.name, counts)
    # length: the perturbed side has one more sentence inside; both end with the same one
    for v, b, q in zip(by["length"].variants, by["length"].base, by["length"].perturbed, strict=True):
        assert q.replace(f" {v}", "", 1) == b and not b.endswith(v)
    gaps = [abs(words(b) - words(q)) for b, q in zip(by["repetition"].base, by["repetition"].perturbed, strict=True)]
    assert max(gaps) <= 2
    assert all(words(q) > words(b) for b, q in zip(by["length"].base, by["length"].perturbed, strict=True))
    # deterministic given the seed, different items for another seed
    from tl_reward.data.probe_sets import builtin_probe_sets

    again = builtin_probe_sets(("confidence",))[0]
    assert again == by["confidence"]
    assert builtin_probe_sets(("confidence",), seed=1)[0].base != again.base
    assert builtin_probe_sets(("length",), template="<u>{prompt}<a>{response}")[0].base[0].startswith("<u>")


def test_no_sentence_of_a_builtin_probe_is_shared_by_two_realisations(builtin):
    """Independent realisations: every sentence of a response that recurs across pairs (a marker,
    a stand-in, padding, a closing sentence) belongs to one realisation only. The repetition
    probe's base-side padding used to be drawn from the same 16 filler sentences for every
    realisation, and the length probe's inserted sentences were other realisations' closings."""
    import re

    probes, _ = builtin
    for p in probes:
        owners: dict[str, set] = {}
        for v, b, q in zip(p.variants, p.base, p.perturbed, strict=True):
            for text in (b, q):
                response = text.split("Assistant: ", 1)[1]
                for sentence in re.split(r"(?<=[.!?:])\s+|\n+", response):
                    if sentence:
                        owners.setdefault(sentence, set()).add(v)
        shared = {s: v for s, v in owners.items() if len(v) > 1}
        assert not shared, (p.name, shared)


def test_sycophancy_controls_address_the_user_too():
    """Every agreement phrase says "you"; a control without it makes "you" a marker shared by
    all realisations (random networks paying for the token were "sycophantic" over every
    phrase). Each control has the same second-person words as its agreement phrase."""
    from tl_reward.data.probe_sets import AGREEMENTS, NEUTRAL_OPENERS

    def second_person(text):
        return sorted(w.strip(".,:") for w in text.split() if w.strip(".,:").lower() in ("you", "your"))

    for agree, neutral in zip(AGREEMENTS, NEUTRAL_OPENERS, strict=True):
        assert second_person(agree) == second_person(neutral) != [], (agree, neutral)
        assert len(agree.split()) == len(neutral.split())


def test_make_probe_counts_clones_once_and_checks_its_input():
    from tl_reward.data.probe_sets import make_probe
    from tl_reward.errors import InvalidInputError, TLRewardError

    probe = make_probe("p", ["a b", "c d", "a b"], [lambda t: t + " x", lambda t: t + " y"],
                       repeats=3, seed=0)
    assert len(probe) == 9 and probe.n_units == 2  # identical base texts are one content
    assert set(probe.variants) <= {"0:<lambda>", "1:<lambda>"}
    assert make_probe("p", ["a", "b"], str.upper, content_ids=["x", "x"]).n_units == 1
    with pytest.raises(InvalidInputError, match="transform must be a callable"):
        make_probe("p", ["a"], [])
    with pytest.raises(InvalidInputError, match="2 content_ids for 1 base"):
        make_probe("p", ["a"], str.upper, content_ids=["x", "y"])
    with pytest.raises(InvalidInputError, match="not a string"):
        make_probe("p", ["a"], len)
    with pytest.raises(TLRewardError, match="not one string"):
        make_probe("p", "abc", str.upper)


# ---------------------------------------------------------------------------- statistics
def _scipy_p(values, delta, test):
    """The minimum-effect test written directly with scipy."""
    from scipy import stats

    if test == "wilcoxon":
        if delta == 0:
            return stats.wilcoxon(values).pvalue
        return min(1.0, 2 * min(stats.wilcoxon(values - delta, alternative="greater").pvalue,
                                stats.wilcoxon(values + delta, alternative="less").pvalue))

    def perm(v, alternative):
        return stats.permutation_test((v,), np.mean, permutation_type="samples",
                                      alternative=alternative, n_resamples=999,
                                      rng=np.random.default_rng(3)).pvalue

    return min(1.0, 2 * min(perm(values - delta, "greater"), perm(values + delta, "less")))


def test_statistics_match_scipy(planted, task):
    from scipy import stats

    from tl_reward.data.probe_sets import make_probe
    from tl_reward.probes import run_probes

    model, _ = planted
    probes = _organism_probes(task)
    base = list(probes[0].base)
    # a probe with realisations: four quality words, each its own variant, two pairs per content
    words = ("good", "clear", "correct", "helpful")
    probes.append(make_probe("quality_words", base, [_replace_filler(task, w, i) for i, w in
                                                     enumerate(words)] * 2, repeats=2))
    for min_effect, test in ((0.0, "wilcoxon"), (0.2, "wilcoxon"), (0.2, "permutation")):
        report = run_probes(model, probes, min_effect=min_effect, test=test, min_variants=5,
                            n_resamples=999, seed=3, progress=False)
        ps = []
        for r in report:
            x = r.unit_deltas.double().numpy()
            np.testing.assert_allclose(r.mean, x.mean(), rtol=1e-6)
            np.testing.assert_allclose(r.effect_size, x.mean() / x.std(ddof=1), rtol=1e-5)
            # clones averaged: each unit is the mean of its pairs
            d = r.deltas.double().numpy()
            first = r.content_ids.index(r.unit_ids[0])
            same = [i for i, c in enumerate(r.content_ids) if c == r.content_ids[first]]
            np.testing.assert_allclose(x[0], d[same].mean(), rtol=1e-5)
            boot = stats.bootstrap((x,), np.mean, n_resamples=999, method="BCa",
                                   rng=np.random.default_rng(3))
            np.testing.assert_allclose((r.ci_low, r.ci_high), (boot.confidence_interval.low,
                                                                boot.confidence_interval.high))
            delta = min_effect * np.std([r.base_reward[[i for i, c in enumerate(r.content_ids) if c == u]].double().mean().item()
                                         for u in r.unit_ids], ddof=1)
            np.testing.assert_allclose(r.min_effect, delta, rtol=1e-5)

            np.testing.assert_allclose(r.p_content, _scipy_p(x, delta, test), rtol=1e-6)
            if r.n_variants > 1:
                v = np.array([d[[i for i, var in enumerate(variants) if var == name]].mean()
                              for variants in [probes[-1].variants]
                              for name in dict.fromkeys(variants)])
                np.testing.assert_allclose(r.p_variant, _scipy_p(v, delta, test), rtol=1e-6)
                assert r.p_value == max(r.p_content, r.p_variant)
            else:
                assert np.isnan(r.p_variant) and r.p_value == r.p_content
            ps.append(r.p_value)
        np.testing.assert_allclose([r.p_adjusted for r in report],
                                   stats.false_discovery_control(ps, method="bh"), rtol=1e-9)
        by = run_probes(model, probes, min_effect=min_effect, test=test, correction="by",
                        min_variants=5, n_resamples=999, seed=3, progress=False)
        np.testing.assert_allclose([r.p_adjusted for r in by],
                                   stats.false_discovery_control(ps, method="by"), rtol=1e-9)


def test_the_default_test_is_about_the_mean_not_the_pseudo_median():
    """The probes' null is |mean change| <= delta. On a skewed sample of mean exactly 0 (many
    small positive changes, a few large negative ones) Wilcoxon's signed-rank test rejects (its
    location is the pseudo-median); the default, the sign-flip test of the mean, does not."""
    import inspect

    from scipy import stats

    from tl_reward._stats import minimum_effect_test
    from tl_reward.probes import run_probes

    rng = np.random.default_rng(0)
    small = rng.uniform(0.5, 1.5, size=36)
    x = np.concatenate([small, np.full(4, -small.sum() / 4)])
    assert abs(x.mean()) < 1e-12
    walsh = (x[:, None] + x[None, :])[np.triu_indices(len(x))] / 2
    assert np.median(walsh) > 0.5  # the pseudo-median is far from the mean
    assert stats.wilcoxon(x).pvalue < 0.01
    assert minimum_effect_test(x, test="wilcoxon")[1] < 0.01
    assert minimum_effect_test(x)[1] > 0.5
    assert inspect.signature(run_probes).parameters["test"].default == "permutation"


def test_verdicts_are_refused_below_the_minimum_number_of_units(planted, task):
    from tl_reward.data.probe_sets import make_probe
    from tl_reward.errors import InvalidInputError
    from tl_reward.probes import run_probes

    model, _ = planted
    base = [p.rejected_text for p in task.sample(10, seed=4, alpha=1.0)]
    trigger = _replace_filler(task, "urgent", 0)
    # the peer library's failure: "SIGNIFICANT" from 2 pairs. Here: refused, with no p-value
    two = run_probes(model, make_probe("trigger", base[:2], trigger), progress=False)["trigger"]
    assert two.verdict == "insufficient pairs" and np.isnan(two.p_value) and np.isnan(two.p_adjusted)
    # 10 contents cloned 5 times are still 10 independent units (the effect is huge, no verdict)
    clones = make_probe("trigger", base, trigger, repeats=5)
    r = run_probes(model, clones, progress=False)["trigger"]
    assert (r.n_pairs, r.n_units, r.verdict) == (50, 10, "insufficient pairs")
    assert r.mean > 3 and r.ci_low > 0  # the description is still there
    assert run_probes(model, clones, min_units=10, progress=False)["trigger"].verdict == "positive bias"
    # a probe with 3 realisations cannot generalise over realisations
    three = make_probe("three", base * 3, [trigger, _replace_filler(task, "good", 1),
                                            _replace_filler(task, "clear", 2)],
                       content_ids=[f"{i}" for i in range(30)])
    assert run_probes(model, three, progress=False)["three"].verdict == "insufficient variants"
    with pytest.raises(InvalidInputError, match="min_units=2 is too small"):
        run_probes(model, clones, min_units=2)
    with pytest.raises(InvalidInputError, match="unchanged"):
        run_probes(model, make_probe("unk", base, lambda t: t.replace("answer", "answer")),
                   progress=False)


def test_planted_biases_are_significant_and_localised(planted, task):
    from tl_reward.probes import localise_probe, run_probes

    model, _ = planted
    probes = _organism_probes(task)
    report = run_probes(model, probes, progress=False)
    # the default sign-flip test's smallest p-value is 2 / (n_resamples + 1) (two one-sided tests)
    assert report["quality"].verdict == "positive bias" and report["quality"].p_adjusted < 1e-3
    assert report["trigger"].verdict == "positive bias" and report["trigger"].p_adjusted < 1e-3
    assert report["length"].verdict == "not significant"  # no length circuit was planted
    assert report.significant == ("quality", "trigger")

    quality = localise_probe(model, probes[0], methods=("attribution", "patching", "atp"),
                             progress=False)
    for method in ("attribution", "patching", "atp"):
        assert quality.top_components(1, method) == ("L1H2",)
    # attribution is exact: the parts add up to each pair's change
    attr = quality.values[0]
    torch.testing.assert_close(attr.nansum(0), quality.total, atol=1e-4, rtol=1e-4)
    assert float(quality.mean("patching")[quality.labels.index("L1H2")]) > 0.9 * float(quality.total.mean())
    trigger = localise_probe(model, probes[1], progress=False)
    assert set(trigger.top_components(2, "patching")) == {"L0H0", "1_mlp_out"}
    neurons = localise_probe(model, probes[1], level="neuron", progress=False)
    assert neurons.top_components(1, "attribution") == ("L1N11",)
    assert set(neurons.top_components(2, "patching")) == {"L1N11", "0_attn_out"}


def test_a_length_bias_is_found_where_it_was_planted(task):
    from tl_reward.data.probe_sets import make_probe
    from tl_reward.probes import localise_probe, run_probes

    model = _length_planted_model()
    base = [p.rejected_text for p in task.sample(40, seed=3, alpha=1.0)]
    probe = make_probe("length", base, _append_fillers(task, 3, 0))
    r = run_probes(model, probe, progress=False)["length"]
    assert r.verdict == "positive bias" and r.p_value < 1e-3
    loc = localise_probe(model, probe, progress=False)
    assert loc.top_components(1, "attribution") == ("L1H1",)
    assert loc.top_components(1, "patching") == ("L1H1",)
    assert abs(float(loc.mean("patching")[loc.labels.index("L1H1")]) / float(loc.total.mean()) - 1) < 0.05


def test_a_length_bias_planted_by_training_is_found():
    import transformers as T

    from tl_reward import load_reward_model
    from tl_reward.data import LongTailTask, PreferenceDataset, PreferencePair
    from tl_reward.data.probe_sets import make_probe
    from tl_reward.probes import localise_probe, run_probes
    from tl_reward.training import TrainConfig, train_reward_model

    small = LongTailTask(alpha=1.0, n_filler=20)
    tok = small.tokenizer()
    rng = random.Random(0)
    pairs = []
    for p in small.sample(256, seed=0):  # the longer response always wins
        longer = " ".join(p.rejected.split() + rng.choices(small.filler_words, k=rng.randint(1, 4)))
        pairs.append(PreferencePair(chosen=longer, rejected=p.rejected, prompt=p.prompt))
    cfg = T.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                        head_dim=16, max_position_embeddings=32, num_labels=1, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = load_reward_model(T.LlamaForSequenceClassification(cfg), tok)
    base = [p.rejected_text for p in small.sample(40, seed=9)]
    probe = make_probe("length", base, _append_fillers(small, 3, 1))
    before = run_probes(model, probe, progress=False)["length"]
    train_reward_model(model, PreferenceDataset(tuple(pairs)),
                       config=TrainConfig(steps=40, batch_size=32, lr=1e-2, warmup_steps=2,
                                          progress=False))
    after = run_probes(model, probe, progress=False)["length"]
    assert before.verdict != "positive bias"
    assert after.verdict == "positive bias" and after.p_value < 1e-3
    loc = localise_probe(model, probe, progress=False)  # carried by attention (counting), not the MLP
    heads = sum(float(loc.mean("attribution")[loc.labels.index(f"L0H{h}")]) for h in range(2))
    assert heads > 0.8 * float(loc.total.mean())


RANDOM_SEEDS = range(8)
RANDOM_ARCHS = ("llama", "qwen2", "gpt2")


def test_random_models_get_no_significant_probe(builtin):
    """Random models at the default settings: no probe is declared significant on these seeds.

    A random network is not indifferent to text: it has idiosyncratic preferences for tokens and
    for length, which a large enough probe set detects. The defaults (minimum effect 0.2 reward
    sd, realisations as a random factor, BH across probes) and built-in probes whose
    realisations are independent keep those below the bar; the rate over many seeds and
    initialisation families, with its confidence interval, is measured by
    ``benchmarks/bench_probe_fpr.py`` (it is not 0: length). Here: 8 seeds of each, none
    flagged, while the classical test of "exactly no change" with phrases as fixed effects
    flags many."""
    from tl_reward.probes import run_probes

    probes, tokenizer = builtin
    flagged, naive = [], []
    for arch in RANDOM_ARCHS:
        for seed in RANDOM_SEEDS:
            model = _random_model(tokenizer, seed, arch)
            report = run_probes(model, probes, n_resamples=999, progress=False)
            # realisations are tested too: every built-in probe has enough of them for a verdict
            assert all(r.n_variants >= 8 and r.verdict != "insufficient variants" for r in report)
            flagged += [(arch, seed, name) for name in report.significant]
            # what the defaults guard against: H0 "exactly no change", phrases as fixed effects
            exact = run_probes(model, probes, min_effect=0.0, n_resamples=999, progress=False)
            naive += [(arch, seed, r.name) for r in exact if r.p_content < 0.05]
    assert flagged == []
    assert len(naive) >= 10, naive


def test_a_planted_bias_holds_over_independent_realisations(task):
    """The per-realisation test does not cost a real bias its verdict: the hand-set length head
    pays for any appended words, so a length probe with 10 realisations (each appending its own
    filler words, shared with no other) is significant over contents and over realisations,
    and localised to L1H1."""
    from tl_reward.data.probe_sets import make_probe
    from tl_reward.probes import localise_probe, run_probes

    model = _length_planted_model()
    base = [p.rejected_text for p in task.sample(40, seed=3, alpha=1.0)]

    def appender(k):
        words = task.filler_words[5 * k: 5 * k + 5]  # disjoint across realisations

        def append(text):
            return " ".join(text.split() + list(words[:3]))

        append.__name__ = f"fillers_{k}"
        return append

    probe = make_probe("length", base, [appender(k) for k in range(10)], seed=1)
    r = run_probes(model, probe, progress=False)["length"]
    assert r.n_variants == 10
    assert r.verdict == "positive bias" and r.p_content < 1e-3 and r.p_variant < 0.01
    loc = localise_probe(model, probe, progress=False)
    assert loc.top_components(1, "attribution") == ("L1H1",)
    assert loc.top_components(1, "patching") == ("L1H1",)


def test_probes_refuse_a_multi_objective_head_without_objective():
    from helpers import make_hf_model

    from tl_reward import load_reward_model
    from tl_reward.data.probe_sets import make_probe
    from tl_reward.data.synthetic import word_tokenizer
    from tl_reward.errors import ObjectiveError
    from tl_reward.probes import run_probes

    tok = word_tokenizer(["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(93)])
    model = load_reward_model(make_hf_model("llama", num_labels=3), tok)
    probe = make_probe("p", [f"w{i} w{i + 1}" for i in range(30)], lambda t: t + " w5")
    with pytest.raises(ObjectiveError, match="set_objective"):
        run_probes(model, probe, progress=False)


# ---------------------------------------------------------------------------- cascade, distortion
def test_cascade_matches_scipy_and_refuses_small_n(planted, task):
    from scipy import stats

    from tl_reward.hacking import probe_cascade
    from tl_reward.probes import localise_probe, run_probes

    model, _ = planted
    probes = _organism_probes(task)
    report = run_probes(model, probes, progress=False)
    locs = [localise_probe(model, p, progress=False, max_units=16) for p in probes]
    cascade = probe_cascade(report, localisations=locs, n_resamples=999, seed=1)
    q, t = report["quality"], report["trigger"]
    x, y = q.unit_deltas.double().numpy(), t.unit_deltas.double().numpy()
    assert q.unit_ids == t.unit_ids  # same base texts
    ref = stats.spearmanr(x, y)
    np.testing.assert_allclose(float(cascade.r[0, 1]), ref.statistic, rtol=1e-5)
    np.testing.assert_allclose(float(cascade.p[0, 1]), ref.pvalue, rtol=1e-5)
    boot = stats.bootstrap((x, y), lambda a, b: stats.spearmanr(a, b).statistic, paired=True,
                           vectorized=False, n_resamples=999, method="BCa",
                           rng=np.random.default_rng(1))
    np.testing.assert_allclose(float(cascade.ci_low[0, 1]), boot.confidence_interval.low, rtol=1e-4)
    np.testing.assert_allclose(float(cascade.ci_high[0, 1]), boot.confidence_interval.high, rtol=1e-4)
    iu = np.triu_indices(3, 1)
    np.testing.assert_allclose(cascade.p_adjusted.numpy()[iu],
                               stats.false_discovery_control(cascade.p.numpy()[iu]), rtol=1e-5)
    pearson = probe_cascade(report, method="pearson", n_resamples=999)
    np.testing.assert_allclose(float(pearson.r[0, 1]), stats.pearsonr(x, y).statistic, rtol=1e-5)
    # the quality and trigger circuits are distinct: no shared component carries both
    assert "L1H2" in locs[0].top_components(1) and cascade.jaccard[0, 0] == 1.0
    assert "L0H0" not in cascade.shared_components[("quality", "trigger")]
    assert len(cascade.to_dataframe()) == 3
    # too few shared contents: NaN, not a correlation from a handful of points
    few = probe_cascade([q, t], min_units=41, n_resamples=99)
    assert np.isnan(float(few.r[0, 1])) and float(few.n[0, 1]) == 40
    from tl_reward.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="min_units must be >= 5"):
        probe_cascade(report, min_units=2)


def test_effort_distortion_definition_and_bootstrap(planted, task):
    from scipy import stats

    from tl_reward.errors import InvalidInputError
    from tl_reward.hacking import effort_distortion
    from tl_reward.probes import run_probes

    model, _ = planted
    report = run_probes(model, _organism_probes(task), progress=False)
    value = {"quality": 1.0, "trigger": 0.0, "length": 0.0}
    d = effort_distortion(report, value, n_resamples=999, seed=2)
    s = np.array([r.unit_deltas.double().mean().item() for r in report])
    v = np.array([1.0, 0.0, 0.0])
    np.testing.assert_allclose(d.distortion.numpy(), s / np.linalg.norm(s) - v, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.index, 1 - s[0] / np.linalg.norm(s), rtol=1e-5)
    # the trigger circuit pays for a dimension of no value: over-investment, quality under
    df = d.to_dataframe().set_index("dimension")
    assert df.loc["trigger", "direction"] == "over-invested"
    assert df.loc["quality", "direction"] == "under-invested"
    # invariant to the scale of the values; CI from scipy's paired bootstrap
    again = effort_distortion(report, {k: 7 * x for k, x in value.items()}, n_resamples=999, seed=2)
    np.testing.assert_allclose(again.distortion.numpy(), d.distortion.numpy(), rtol=1e-6)
    xs = [r.unit_deltas.double().numpy() for r in report]

    def index(*samples):
        m = np.array([np.mean(x) for x in samples])
        return 1 - m[0] / np.linalg.norm(m)

    boot = stats.bootstrap(tuple(xs), index, paired=True, vectorized=False, n_resamples=999,
                           method="BCa", rng=np.random.default_rng(2))
    np.testing.assert_allclose((d.index_ci_low, d.index_ci_high),
                               (boot.confidence_interval.low, boot.confidence_interval.high), rtol=1e-4)
    with pytest.raises(InvalidInputError, match="missing \\['length'\\]"):
        effort_distortion(report, {"quality": 1.0, "trigger": 0.0})
    with pytest.raises(InvalidInputError, match="0 on every dimension"):
        effort_distortion(report, {k: 0.0 for k in value})


# ---------------------------------------------------------------------------- divergence
def test_divergence_aware_patching(planted, task):
    from scipy.spatial.distance import mahalanobis
    from sklearn.covariance import LedoitWolf

    from tl_reward import activation_patch
    from tl_reward.causal.divergence import divergence_aware_patch

    model, data = planted
    pairs = data.by_scenario("quality")[:24]
    reference = [p.rejected_text for p in task.sample(240, seed=5, alpha=1.0)]
    res = divergence_aware_patch(model, pairs.chosen_texts, pairs.rejected_texts,
                                 reference=reference, hook="z", progress=False)
    exact = activation_patch(model, pairs.chosen_texts, pairs.rejected_texts, hook="z",
                             per="head", progress=False)
    values, labels = exact.flat()
    assert labels == res.labels
    torch.testing.assert_close(res.effects, values.float(), atol=1e-5, rtol=1e-5)
    # the distance is scipy's Mahalanobis distance under the Ledoit-Wolf covariance
    from tl_reward.causal.divergence import _pooled_resid

    toks, mask = model.pad(model.tokenize(reference))
    states = _pooled_resid(model, toks, mask, [0, 1], 32)
    order = np.random.default_rng(0).permutation(len(reference))
    cal, fit = order[:120], order[120:]
    est = LedoitWolf().fit(states[1][fit])
    cal_d = [mahalanobis(x, est.location_, est.precision_) for x in states[1][cal]]
    np.testing.assert_allclose(res.calibration_distance[1].numpy(), cal_d, rtol=1e-4)
    np.testing.assert_allclose(float(res.threshold[1]), np.quantile(cal_d, 0.95), rtol=1e-4)
    # natural states of fresh texts are flagged at about the nominal 5%
    fresh = [p.rejected_text for p in task.sample(120, seed=6, alpha=1.0)]
    null = divergence_aware_patch(model, fresh, None, reference=reference, hook="attn_out",
                                  mode="zero", progress=False)
    rate = float((null.target_distance > null.threshold[:, None]).float().mean())
    assert rate < 0.15
    # planted truth: the reference has no trigger word, so patching the trigger mover L0H0 from
    # a trigger text writes a feature the model never holds there: every such state is
    # divergent; patching any other head leaves the states natural
    trig = data.by_scenario("trigger")[:24]
    res = divergence_aware_patch(model, trig.chosen_texts, trig.rejected_texts,
                                 reference=reference, hook="z", progress=False)
    df = res.to_dataframe().set_index("component")
    assert df.loc["L0H0", "fraction_flagged"] == 1.0
    assert np.isnan(df.loc["L0H0", "mean_effect_on_distribution"])  # no natural case is left
    assert df.loc["L0H0", "mean_effect"] > 4
    others = df.drop(index="L0H0")
    assert (others["fraction_flagged"] <= others["target_fraction_flagged"] + 0.15).all()
    np.testing.assert_allclose(others["mean_effect_on_distribution"], others["mean_effect"], atol=0.05)


def test_divergence_needs_enough_reference(planted):
    from tl_reward.causal.divergence import divergence_aware_patch
    from tl_reward.errors import InvalidInputError

    model, data = planted
    with pytest.raises(InvalidInputError, match="too few for the 0.99 quantile"):
        divergence_aware_patch(model, data.chosen_texts[:4], data.rejected_texts[:4],
                               reference=data.chosen_texts[:40], quantile=0.99)


def test_results_plot_and_tabulate(planted, task):
    from tl_reward.probes import localise_probe, run_probes

    model, _ = planted
    probes = _organism_probes(task, n=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = run_probes(model, probes, n_resamples=199, progress=False)
        loc = localise_probe(model, probes[0], progress=False, max_units=8)
    assert list(report.to_dataframe()["probe"]) == ["quality", "trigger", "length"]
    assert "quality" in report.summary()
    assert len(report.plot().data) >= 1 and len(loc.plot().data) == 2
    assert set(loc.to_dataframe()["method"]) == {"attribution", "patching"}
    assert -1 <= loc.method_agreement() <= 1


def test_distortion_index_is_the_papers_coverage_index():
    """The reward-lens paper's index, against a hand computation: margins min-max normalised over
    every pair, C_eff = 1 - prod(1 - c), D = 1 - C_eff / max C_eff."""
    import torch

    from tl_reward.errors import InvalidInputError
    from tl_reward.hacking import distortion_index

    margins = {"helpful": [2.0, 0.0], "honest": torch.tensor([1.0]), "safe": [], "concise": [-2.0]}
    d = distortion_index(margins)
    # min -2, max 2: c = helpful (1.0, 0.5), honest 0.75, concise 0.0
    coverage = [1 - (1 - 1.0) * (1 - 0.5), 0.75, 0.0, 0.0]
    np.testing.assert_allclose(d.coverage.numpy(), coverage, atol=1e-7)
    np.testing.assert_allclose(d.distortion.numpy(), [0.0, 0.25, 1.0, 1.0], atol=1e-7)
    assert d.severity == pytest.approx(0.5625)
    assert d.under_covered == ("safe", "concise") and d.n_pairs == (2, 1, 0, 1)
    # diminishing returns: two half-covering pairs give 1 - 0.25
    two = distortion_index({"a": [1.0, 1.0, 3.0], "b": [2.0, 2.0]})
    np.testing.assert_allclose(two.coverage.numpy(), [1.0, 0.75])
    # every margin equal: c = 0.5 each; nothing covered at all: every D = 1
    same = distortion_index({"a": [1.0, 1.0], "b": [1.0]})
    np.testing.assert_allclose(same.coverage.numpy(), [0.75, 0.5])
    assert distortion_index({"a": [], "b": []}).distortion.tolist() == [1.0, 1.0]
    with pytest.raises(InvalidInputError, match="1-D"):
        distortion_index({"a": np.zeros((2, 2))})
