"""Probes and CART discovery on the dpo_longtail organism's implicit reward: the numbers quoted in
the README (section "Rewards that are not a head"), on the settings tests/test_implicit_tools.py
asserts on.

    PYTHONPATH=$PWD python benchmarks/implicit_probes_discovery.py
"""

import random

from tl_reward.cart.discovery import discover, split_texts
from tl_reward.data.probe_sets import make_probe
from tl_reward.data.synthetic import KEY_WORDS, QUALITY_WORDS
from tl_reward.organisms import dpo
from tl_reward.probes import run_probes


def plain_texts(task, n, seed):
    """Head-scenario texts with neither quality nor key words."""
    words = set(QUALITY_WORDS) | set(KEY_WORDS)
    texts = [t for p in task.sample(30 * n, seed=seed, alpha=1.0)
             for t in (p.chosen_text, p.rejected_text) if not set(t.split()) & words]
    return texts[:n]


def replace_filler(task, word, seed):
    rng = random.Random(seed)
    fillers = set(task.filler_words)

    def insert_word(text):
        words = text.split()
        start = words.index("answer") + 1
        words[rng.choice([j for j in range(start, len(words)) if words[j] in fillers])] = word
        return " ".join(words)

    return insert_word


def main() -> None:
    model, _ = dpo.load()
    task = dpo.TASK
    base = plain_texts(task, 40, seed=3)
    report = run_probes(model, [make_probe("quality", base, replace_filler(task, "helpful", 0)),
                                make_probe("key", base, replace_filler(task, "brief", 1))],
                        progress=False)
    print(report.summary())
    data = task.sample(300, seed=11, alpha=0.5, noise=0.0)
    texts = [t for p in data for t in (p.chosen_text, p.rejected_text)]
    tail, head = split_texts(texts, lambda t: task.scenario_of(t) != "head")
    found = discover(model, tail, head, top_k=8, max_validation=64, progress=False)
    columns = ["circuit", "effect_tail", "effect_head", "p_effect_adjusted", "kept"]
    print(found.to_dataframe()[columns].to_string())


if __name__ == "__main__":
    main()
