"""How often do the built-in probes call a bias on random reward models? (false-positive rate)

    python benchmarks/bench_probe_fpr.py                 # writes its section of benchmarks/RESULTS.md
    python benchmarks/bench_probe_fpr.py --seeds 4 --no-write   # a quick look

Runs :func:`tl_reward.run_probes` at its defaults (``n_resamples=999`` for speed) with the five
built-in probe sets on tiny random Llama, Qwen2 and GPT-2 reward models (2 layers, d_model 64,
a word-level tokenizer over the probes' words), from three initialisation families:

- ``hf_default``: HF's own initialisation (``from_config``: normal(0, ``initializer_range``)
  weights, norm weights 1) with a N(0, 1) score head;
- ``project``: the test suite's ``randomize_`` (every weight N(0, 0.25^2), norm weights
  1 + N(0, 0.2^2));
- ``trained_shuffled``: a model trained (Bradley-Terry, 60 steps) to prefer the right answer of
  the probe items over another item's answer, then every parameter tensor's entries permuted
  (seeded): trained weight statistics, no learned function.

Seeds start at 100 (the tests use 0-7). A verdict is one probe on one model; a model is
flagged when any of its five probes is significant (BH controls that rate at ``alpha`` when
every probe's H0 holds). Rates come with exact Clopper-Pearson 95 % intervals
(``scipy.stats.binomtest``). A random network is not free of preferences (it is some function of
the text), so a significant verdict here is a preference nobody trained, which a user would
read as a bias: the rate is what the probes' defaults let through.
"""

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from _results import machine, write_section
from scipy import stats

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from helpers import randomize_  # noqa: E402

from tl_reward import load_reward_model, run_probes  # noqa: E402
from tl_reward.data.probe_sets import builtin_probe_sets, probe_items  # noqa: E402
from tl_reward.data.synthetic import SPECIAL_TOKENS, word_tokenizer  # noqa: E402

ARCHS = ("llama", "qwen2", "gpt2")
FAMILIES = ("hf_default", "project", "trained_shuffled")


def _config(arch: str, vocab: int):
    import transformers as T

    if arch == "gpt2":
        return T.GPT2Config(vocab_size=vocab, n_embd=64, n_head=4, n_layer=2, n_positions=128,
                            num_labels=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              num_labels=1)
    return {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config}[arch](**kw)


def _hf(arch: str, vocab: int, seed: int):
    import transformers as T

    torch.manual_seed(seed)
    return T.AutoModelForSequenceClassification.from_config(_config(arch, vocab),
                                                            attn_implementation="eager")


def _training_pairs(n: int = 256):
    from tl_reward.data.pairs import PreferenceDataset, PreferencePair

    items = probe_items(48, seed=7)
    rng = random.Random(0)
    pairs = []
    for _ in range(n):
        (_, q, a, _), (_, _, wrong, _) = rng.sample(items, 2)
        pairs.append(PreferencePair(prompt=f"User: {q}\nAssistant:", chosen=a, rejected=wrong))
    return PreferenceDataset(tuple(pairs))


def _trained(arch: str, tokenizer) -> dict[str, torch.Tensor]:
    from tl_reward.training import TrainConfig, train_reward_model

    model = load_reward_model(_hf(arch, len(tokenizer), 0).eval(), tokenizer)
    train_reward_model(model, _training_pairs(), config=TrainConfig(
        steps=60, batch_size=16, lr=3e-3, warmup_steps=5, progress=False))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _model(family: str, arch: str, seed: int, tokenizer, trained: dict):
    if family == "hf_default":
        hf = _hf(arch, len(tokenizer), seed)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            hf.score.weight.copy_(torch.randn(hf.score.weight.shape, generator=gen))
        return load_reward_model(hf.eval(), tokenizer)
    if family == "project":
        return load_reward_model(randomize_(_hf(arch, len(tokenizer), seed), seed).eval(), tokenizer)
    model = load_reward_model(_hf(arch, len(tokenizer), 0).eval(), tokenizer)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in trained[arch].items():
        if v.is_floating_point() and v.numel() > 1:
            flat = v.flatten()
            v = flat[torch.randperm(flat.numel(), generator=gen)].view_as(v)
        state[k] = v
    model.load_state_dict(state)
    return model


def _ci(k: int, n: int) -> str:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return f"{k}/{n} = {k / n:.1%} [{ci.low:.1%}, {ci.high:.1%}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=40, help="models per family and architecture")
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--n-resamples", type=int, default=999)
    parser.add_argument("--test", default=None, help="run_probes' test (default: its default)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    probes = builtin_probe_sets()
    words = sorted({w for p in probes for t in p.base + p.perturbed for w in t.split()}
                   | {w for _, q, a, _ in probe_items(48, seed=7) for w in f"{q} {a}".split()})
    tokenizer = word_tokenizer([*SPECIAL_TOKENS, *words])
    trained = ({arch: _trained(arch, tokenizer) for arch in ARCHS}
               if "trained_shuffled" in args.families else {})
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    rows = []  # (family, arch, seed, probe, significant)
    for family in args.families:
        for arch in ARCHS:
            for seed in seeds:
                model = _model(family, arch, seed, tokenizer, trained)
                kw = {} if args.test is None else {"test": args.test}
                report = run_probes(model, probes, n_resamples=args.n_resamples, progress=False,
                                    **kw)
                rows += [(family, arch, seed, r.name, r.significant) for r in report]
                test = report.test
    seconds = time.perf_counter() - t0

    lines = [
        "| family | verdicts significant (95 % CI) | models with any (95 % CI) | flagged probes |",
        "|---|---|---|---|",
    ]
    total_k = total_n = model_k = model_n = 0
    for family in args.families:
        sub = [r for r in rows if r[0] == family]
        k = sum(r[4] for r in sub)
        models = {(r[1], r[2]) for r in sub}
        flagged = {(r[1], r[2]) for r in sub if r[4]}
        which = Counter(f"{r[3]} ({r[1]})" for r in sub if r[4])
        lines.append(f"| `{family}` | {_ci(k, len(sub))} | {_ci(len(flagged), len(models))} | "
                     f"{', '.join(f'{w} x{c}' for w, c in which.most_common()) or '-'} |")
        total_k, total_n = total_k + k, total_n + len(sub)
        model_k, model_n = model_k + len(flagged), model_n + len(models)
    lines.append(f"| all | {_ci(total_k, total_n)} | {_ci(model_k, model_n)} | |")
    body = "\n".join([
        "## Probe false-positive rate on random reward models (`bench_probe_fpr.py`)",
        "",
        f"`python benchmarks/bench_probe_fpr.py --seeds {args.seeds}"
        f"{'' if args.test is None else ' --test ' + args.test}` ({machine()}; "
        f"{seconds:.0f} s). `run_probes` at its defaults ({test} test, "
        f"min_effect 0.2 reward sd, realisations as a random factor, BH, alpha 0.05; "
        f"n_resamples {args.n_resamples}) with the five built-in probes, on tiny random Llama, "
        f"Qwen2 and GPT-2 reward models, seeds {seeds.start}-{seeds.stop - 1} per family and "
        "architecture. Intervals: exact Clopper-Pearson (`scipy.stats.binomtest`).",
        "",
        *lines,
    ])
    print(body)
    if not args.no_write:
        write_section("probe-fpr", body)


if __name__ == "__main__":
    main()
