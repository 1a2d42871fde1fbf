"""Preference pairs, loaders, the synthetic long-tail task and the reward-model trainer."""

import json
import math

import pytest
import torch

# ---------------------------------------------------------------------------- pairs & loaders


def test_pair_texts_join_prompt_and_response():
    from tl_reward.data import PreferencePair

    p = PreferencePair(prompt="query a b", chosen="answer c", rejected="answer d")
    assert p.chosen_text == "query a b answer c"
    assert PreferencePair(prompt="Q:\n", chosen="yes", rejected="no").chosen_text == "Q:\nyes"
    assert PreferencePair(chosen="whole text", rejected="other").rejected_text == "other"
    chat = PreferencePair(
        prompt="hi", chosen=({"role": "assistant", "content": "hello"},),
        rejected=({"role": "assistant", "content": "go away"},),
    )
    assert chat.chosen_text == [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}]


ROWS = [
    {"prompt": "query a", "chosen": "answer good", "rejected": "answer bad", "subset": "s1"},
    {"prompt": "query b", "chosen": "answer clear", "rejected": "answer x", "scenario": "t",
     "tail": True},
]


def test_loaders_agree_across_formats(tmp_path):
    import pandas as pd

    from tl_reward.data import load_pairs, pairs_from_hf_dataset

    class FakeHFDataset:  # the part of datasets.Dataset the loader uses
        column_names = ["prompt", "chosen", "rejected"]
        features = {}

        def __iter__(self):
            return iter(ROWS)

    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    sources = [ROWS, path, str(path), pd.DataFrame(ROWS), FakeHFDataset()]
    loaded = [load_pairs(s) for s in sources] + [pairs_from_hf_dataset(FakeHFDataset())]
    for data in loaded:
        assert data.pairs == loaded[0].pairs
    data = loaded[0]
    assert data.scenarios == ("s1", "t")  # RewardBench's subset column is the scenario
    assert data.is_tail == (False, True)
    assert len(data.tail()) == 1 and data.tail()[0].chosen == "answer clear"
    # round trip
    out = tmp_path / "out.jsonl"
    data.to_jsonl(out)
    assert load_pairs(out).pairs == data.pairs
    assert load_pairs(data.to_dataframe()).pairs == data.pairs


def test_conversational_rows_load():
    from tl_reward.data import load_pairs

    rows = [{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}]
    data = load_pairs(rows)
    assert data[0].chosen_text[-1] == {"role": "assistant", "content": "a"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "p", "chosen": "c"}, r"row 2 has no \['rejected'\]"),
        ({"chosen": "", "rejected": "r"}, r"row 2: column 'chosen' is an empty string"),
        ({"chosen": 3, "rejected": "r"}, r"row 2: column 'chosen' must be a string"),
        ({"chosen": "c", "rejected": [{"role": "user"}]}, r"row 2: column 'rejected' message 0"),
        ({"chosen": "c", "rejected": "r", "tail": "yes"}, r"row 2: column 'tail' must be a bool"),
        ({"chosen": "c", "rejected": [{"role": "user", "content": "x"}]}, r"row 2: .*both"),
    ],
)
def test_bad_rows_are_named(bad, message, tmp_path):
    from tl_reward.data import load_pairs
    from tl_reward.errors import InvalidInputError

    rows = ROWS + [bad]
    with pytest.raises(InvalidInputError, match=message):
        load_pairs(rows)
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(InvalidInputError, match="line 3"):
        load_pairs(path)


def test_bad_sources_are_refused(tmp_path):
    import pandas as pd

    from tl_reward.data import load_pairs
    from tl_reward.errors import InvalidInputError

    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    with pytest.raises(InvalidInputError, match="line 2 is not valid JSON"):
        load_pairs(path)
    df = pd.DataFrame(ROWS, index=["a", "b"]).drop(columns=["rejected"])
    with pytest.raises(InvalidInputError, match="DataFrame index 'a'"):
        load_pairs(df)

    class FakeSplit:
        column_names = ["chosen"]

    with pytest.raises(InvalidInputError, match="DatasetDict with splits \\['train'\\]"):
        load_pairs({"train": FakeSplit()})
    with pytest.raises(InvalidInputError, match="no rows"):
        load_pairs([])
    with pytest.raises(InvalidInputError, match="cannot read"):
        load_pairs(42)


CHAT_ROWS = [
    {"prompt": [{"role": "user", "content": f"query w00{i} w01{i}"}],
     "chosen": [{"role": "assistant", "content": f"answer good w02{i}"}],
     "rejected": [{"role": "assistant", "content": f"answer bad w02{i} w03{i}"}]}
    for i in range(4)
]


@pytest.mark.parametrize("writer", ["pandas", "json"])
def test_csv_chat_cells_are_chats_and_score_as_the_jsonl(writer, tmp_path):
    """A CSV column of chats (as pandas writes lists: their repr; or JSON text) loads as chats:
    the same pairs, and the same margins, as the JSONL file of those chats."""
    import pandas as pd

    from tl_reward import organisms
    from tl_reward.data import load_pairs

    jsonl, csv = tmp_path / "chats.jsonl", tmp_path / "chats.csv"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
    if writer == "pandas":
        pd.DataFrame(CHAT_ROWS).to_csv(csv, index=False)
    else:
        pd.DataFrame([{k: json.dumps(v) for k, v in r.items()} for r in CHAT_ROWS]).to_csv(
            csv, index=False)
    from_csv, from_jsonl = load_pairs(csv), load_pairs(jsonl)
    assert from_csv.pairs == from_jsonl.pairs
    assert isinstance(from_csv[0].chosen_text, list)
    model, _, _ = organisms.load("longtail")
    a = model.score_pairs(from_csv.chosen_texts, from_csv.rejected_texts, progress=False)
    b = model.score_pairs(from_jsonl.chosen_texts, from_jsonl.rejected_texts, progress=False)
    torch.testing.assert_close(a.margin, b.margin, atol=0, rtol=0)
    assert load_pairs(pd.read_csv(csv)).pairs == from_jsonl.pairs  # a DataFrame read by the user


def test_csv_errors_name_the_file_and_refuse_broken_chat_cells(tmp_path):
    import pandas as pd

    from tl_reward.data import load_pairs
    from tl_reward.errors import InvalidInputError

    broken = tmp_path / "broken_chat.csv"
    pd.DataFrame([{"chosen": "[{'role': 'user', 'content': 'a'", "rejected": "b"}]).to_csv(
        broken, index=False)
    with pytest.raises(InvalidInputError,
                       match=r"broken_chat.csv: data row 0: .*'chosen' looks like a list of chat"):
        load_pairs(broken)
    missing = tmp_path / "no_rejected.csv"
    pd.DataFrame([{"chosen": "a", "other": "b"}]).to_csv(missing, index=False)
    with pytest.raises(InvalidInputError, match=r"no_rejected.csv: data row 0: .*'rejected'"):
        load_pairs(missing)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InvalidInputError, match="empty.csv is not a readable CSV"):
        load_pairs(empty)
    # a plain string that merely starts with a bracket stays a string
    plain = tmp_path / "plain.csv"
    pd.DataFrame([{"chosen": "[1] see the list", "rejected": "NA"}]).to_csv(plain, index=False)
    pair = load_pairs(plain)[0]
    assert (pair.chosen, pair.rejected) == ("[1] see the list", "NA")


def test_pairs_without_a_scenario_are_labelled_all():
    from tl_reward.data import PreferencePair, load_pairs

    assert load_pairs([{"chosen": "a", "rejected": "b"}]).scenarios == ("all",)
    assert PreferencePair(chosen="a", rejected="b").scenario == "all"
    assert load_pairs([{"chosen": "a", "rejected": "b", "subset": "s"}]).scenarios == ("s",)


# ---------------------------------------------------------------------------- the task
def test_generator_is_deterministic_per_seed():
    from tl_reward.data import LongTailTask

    task = LongTailTask(alpha=0.8, noise=0.1)
    a, b, c = task.sample(300, seed=3), task.sample(300, seed=3), task.sample(300, seed=4)
    assert a.pairs == b.pairs
    assert a.metadata["flipped"] == b.metadata["flipped"]
    assert a.pairs != c.pairs


@pytest.mark.parametrize("alpha, tail_zipf", [(0.9, 1.0), (0.6, 0.0), (0.97, 2.0)])
def test_head_tail_mix_matches_alpha(alpha, tail_zipf):
    from tl_reward.data import LongTailTask

    task = LongTailTask(alpha=alpha, n_tail=3, tail_zipf=tail_zipf)
    n = 8000
    data = task.sample(n, seed=0)
    counts = data.scenario_counts()
    for scenario, p in task.scenario_probabilities.items():
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts.get(scenario, 0) - n * p) < 4 * sigma + 1, scenario
    assert math.isclose(sum(task.scenario_probabilities.values()), 1.0)
    assert all(p.tail == (p.scenario != "head") for p in data)
    # tail types are rarer in order (tail_zipf > 0), equally rare with tail_zipf = 0
    tail_p = list(task.scenario_probabilities.values())[1:]
    assert tail_p == sorted(tail_p, reverse=True)


def test_gold_rule_holds_and_tails_defeat_the_head_rule():
    from tl_reward.data import LongTailTask

    task = LongTailTask(alpha=0.5, n_tail=4, noise=0.0)
    data = task.sample(2000, seed=1)
    gold_c = task.gold_rewards(data.chosen_texts)
    gold_r = task.gold_rewards(data.rejected_texts)
    assert bool((gold_c > gold_r).all())
    head_rule = lambda text: LongTailTask.gold_reward(task, text.split(" answer ")[1])  # noqa: E731
    for p in data:
        assert task.scenario_of(p.chosen_text) == p.scenario
        by_head_rule = head_rule(p.chosen_text) - head_rule(p.rejected_text)
        assert (by_head_rule > 0) == (not p.tail), p  # the head rule is wrong on every tail pair
    # label noise swaps exactly the flipped pairs
    noisy = LongTailTask(alpha=0.5, noise=0.2).sample(2000, seed=1)
    wrong = (task.gold_rewards(noisy.chosen_texts) < task.gold_rewards(noisy.rejected_texts))
    flipped = torch.zeros(2000, dtype=torch.bool)
    flipped[list(noisy.metadata["flipped"])] = True
    assert torch.equal(wrong, flipped)
    assert abs(float(flipped.float().mean()) - 0.2) < 0.04


def test_gold_reward_of_hand_written_texts():
    from tl_reward.data import LongTailTask

    task = LongTailTask()
    assert task.gold_reward("query w001 answer good clear brief w003") == 1.0
    assert task.gold_reward("query urgent w001 answer good clear brief w003") == 0.0
    assert task.gold_reward("query legal answer cite cite good") == 3.0
    assert task.gold_reward("query legal answer brief") == 0.0  # another scenario's key
    assert task.gold_reward("<bos> good good <eos>") == 2.0  # no answer mark: all response
    chat = [{"role": "user", "content": "w001 urgent"}, {"role": "assistant", "content": "brief"}]
    assert task.gold_reward(chat) == 2.0 and task.scenario_of(chat) == "tail_urgent"
    assert task.rule("head")["good"] == 1.0
    with pytest.raises(ValueError, match="unknown scenario"):
        task.rule("tail_nope")


def test_task_parameters_are_checked():
    from tl_reward.data import LongTailTask
    from tl_reward.errors import InvalidInputError

    for kwargs in ({"alpha": 1.5}, {"n_tail": 0}, {"n_tail": 99}, {"noise": 0.5},
                   {"tail_zipf": -1.0}, {"response_len": 3}):
        with pytest.raises(InvalidInputError, match=next(iter(kwargs))):
            LongTailTask(**kwargs)


def test_tokenizer_round_trips_and_chat_template_agrees():
    from tl_reward.data import LongTailTask

    task = LongTailTask()
    tok = task.tokenizer()
    assert len(tok) == len(task.vocabulary)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "query w001 urgent answer good brief w199"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:-1]) == text
    assert tok("query zzz")["input_ids"][2] == tok.unk_token_id
    chat = [{"role": "user", "content": "w001 urgent"},
            {"role": "assistant", "content": "good brief w199"}]
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert tok(rendered, add_special_tokens=False)["input_ids"] == ids


# ---------------------------------------------------------------------------- the trainer
def _tiny_hf(tok, seed=0):
    import transformers as T

    cfg = T.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=32,
        num_labels=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    return T.LlamaForSequenceClassification(cfg)


@pytest.fixture(scope="module")
def small_task():
    from tl_reward.data import LongTailTask

    task = LongTailTask(alpha=1.0, n_filler=20)
    return task, task.tokenizer(), task.sample(256, seed=0)


def _fast(**kw):
    from tl_reward.training import TrainConfig

    return TrainConfig(**{"steps": 25, "batch_size": 32, "lr": 1e-2, "warmup_steps": 2,
                          "progress": False, **kw})


def test_trainer_lowers_the_loss_of_an_hf_model_deterministically(small_task):
    from tl_reward.training import pairwise_accuracy, train_reward_model

    task, tok, data = small_task
    before = pairwise_accuracy(_tiny_hf(tok), data, tokenizer=tok, progress=False)
    runs = []
    for _ in range(2):
        model = _tiny_hf(tok)
        result = train_reward_model(model, data, tokenizer=tok, config=_fast())
        runs.append((model, result))
    (m1, r1), (m2, r2) = runs
    assert r1.losses[-5:].mean() < 0.8 * r1.losses[:5].mean()
    assert torch.equal(r1.losses, r2.losses)
    for p1, p2 in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p1, p2)
    after = pairwise_accuracy(m1, data, tokenizer=tok, progress=False)
    assert after > max(before, 0.7)
    r3 = train_reward_model(_tiny_hf(tok), data, tokenizer=tok, config=_fast(seed=1))
    assert not torch.equal(r1.losses, r3.losses)  # the seed orders the batches


def test_trainer_trains_a_hooked_reward_model(small_task):
    from tl_reward import load_reward_model
    from tl_reward.training import pair_margins, train_reward_model

    task, tok, data = small_task
    model = load_reward_model(_tiny_hf(tok), tok)
    result = train_reward_model(model, data, config=_fast())
    assert result.losses[-5:].mean() < 0.8 * result.losses[:5].mean()
    assert not model.training  # mode restored
    margins = pair_margins(model, data, progress=False)
    scores = model.score_pairs(data.chosen_texts, data.rejected_texts, progress=False)
    torch.testing.assert_close(margins, scores.margin, atol=1e-5, rtol=1e-5)


def test_trainer_plugs_in_weights_extra_terms_and_gold_mse(small_task):
    from tl_reward.training import TrainBatch, train_reward_model

    task, tok, data = small_task
    seen = []

    def l2_margin(batch: TrainBatch) -> torch.Tensor:
        seen.append(batch.pair_index.clone())
        assert batch.tokens.shape[0] == 2 * len(batch.pair_index)
        return 1e-3 * (batch.margins ** 2).mean()

    weights = torch.ones(len(data))
    weights[::2] = 0.0  # half the pairs do not count
    result = train_reward_model(
        _tiny_hf(tok), data, tokenizer=tok, config=_fast(mse_weight=0.5),
        gold=task.gold_rewards, sample_weights=weights, extra_losses={"l2": l2_margin},
    )
    assert set(result.terms) == {"bt", "mse", "l2"}
    assert len(seen) == 25
    assert result.terms["mse"][-5:].mean() < result.terms["mse"][:5].mean()
    total = result.terms["bt"] + 0.5 * result.terms["mse"] + result.terms["l2"]
    torch.testing.assert_close(result.losses, total)
    # zero-weight pairs give no gradient: training only on them changes nothing
    model = _tiny_hf(tok)
    before = [p.clone() for p in model.parameters()]
    train_reward_model(model, data[:32], tokenizer=tok,
                       config=_fast(steps=2, weight_decay=0.0, batch_size=32),
                       sample_weights=torch.zeros(32))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_trainer_refuses_bad_arguments(small_task):
    from tl_reward.errors import InvalidInputError
    from tl_reward.training import TrainConfig, train_reward_model

    task, tok, data = small_task
    model = _tiny_hf(tok)
    with pytest.raises(InvalidInputError, match="sample_weights has 3 entries for 256 pairs"):
        train_reward_model(model, data, tokenizer=tok, config=_fast(), sample_weights=[1, 1, 1])
    with pytest.raises(InvalidInputError, match="pair 5 has -1.0"):
        w = torch.ones(256)
        w[5] = -1
        train_reward_model(model, data, tokenizer=tok, config=_fast(), sample_weights=w)
    with pytest.raises(InvalidInputError, match="needs gold"):
        train_reward_model(model, data, tokenizer=tok, config=_fast(mse_weight=1.0))
    with pytest.raises(InvalidInputError, match="reserved"):
        train_reward_model(model, data, tokenizer=tok, config=_fast(),
                           extra_losses={"bt": lambda b: torch.zeros(())})
    with pytest.raises(InvalidInputError, match="steps must be >= 1, got 0"):
        TrainConfig(steps=0)
    with pytest.raises(InvalidInputError, match="no tokenizer"):
        train_reward_model(model, data, config=_fast())


@pytest.mark.parametrize("prompt,response", [
    ("Q: why?", "Because."), ("Q: why? ", "Because."), ("Q: why?", "\nBecause."), ("", "Alone.")])
def test_prompt_and_response_split_where_the_scored_text_joins_them(prompt, response):
    from tl_reward import errors
    from tl_reward.data.pairs import PreferencePair

    pair = PreferencePair(chosen=response, rejected="No.", prompt=prompt)
    head, tail = pair.prompt_and_response("chosen")
    assert head + tail == pair.chosen_text and tail == response
    with pytest.raises(errors.InvalidInputError, match="'both'"):
        pair.prompt_and_response("both")
