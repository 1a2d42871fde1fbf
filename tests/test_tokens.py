"""TransformerLens's tokenizer habits on a reward model, against the HF tokenizer itself, and
the warnings on inputs that give meaningless numbers (mostly unknown tokens, identical pairs)."""

import warnings

import pytest
import torch

CORPUS = ["the quick brown fox jumps over the lazy dog", "a reward model reads the whole text",
          "good answers are short and clear", "the dog sleeps while the fox runs"] * 4
TEXTS = ["the quick fox", "a reward model reads the whole text twice", "clear"]


def _bpe_model():
    """A GPT-2 reward model with a byte-level BPE tokenizer (no BOS/EOS added, pad = eos)."""
    import transformers as T
    from helpers import randomize_
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tl_reward import load_reward_model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                     pad_token="<|endoftext|>", padding_side="right")
    cfg = T.GPT2Config(n_embd=32, n_head=2, n_layer=2, n_positions=64, vocab_size=len(fast),
                       num_labels=1, pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    hf = randomize_(T.GPT2ForSequenceClassification(cfg), seed=0).eval()
    return load_reward_model(hf, fast), fast


@pytest.fixture(scope="module", params=["word-level (BOS/EOS, chat template)", "byte-level BPE"])
def model_tok(request):
    if request.param.startswith("word"):
        from tl_reward import organisms

        model, tok, data = organisms.load("longtail")
        return model, tok, ["query w001 answer good", data.chosen_texts[0],
                            "query w002 w003 answer brief clear"]
    model, tok = _bpe_model()
    return model, tok, TEXTS


def test_to_tokens_and_mask_are_the_hf_tokenizers(model_tok):
    model, tok, texts = model_tok
    for side in ("right", "left"):
        tok.padding_side = side
        ref = tok(texts, padding=True, return_tensors="pt")
        tokens, mask = model.to_tokens_and_mask(texts, padding_side=side)
        assert torch.equal(tokens, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])
    tok.padding_side = "right"
    assert torch.equal(model.to_tokens(texts), tok(texts, padding=True, return_tensors="pt")["input_ids"])
    assert torch.equal(model.to_tokens(texts[1]), torch.tensor([tok(texts[1])["input_ids"]]))
    assert model.to_tokens(texts[1], prepend_bos=False)[0].tolist() == tok(
        texts[1], add_special_tokens=False)["input_ids"]


def test_rewards_from_to_tokens_are_score(model_tok):
    """Right-padded tokens give score()'s rewards without a mask; left-padded ones with it."""
    model, tok, texts = model_tok
    want = model.score(texts, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(model.to_tokens(texts)), want, atol=1e-5, rtol=0)
        tokens, mask = model.to_tokens_and_mask(texts, padding_side="left")
        torch.testing.assert_close(model(tokens, attention_mask=mask), want, atol=1e-5, rtol=0)
    from tl_reward.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="to_tokens_and_mask"):
        model.to_tokens(texts, padding_side="left")


def test_string_conversions_are_the_hf_tokenizers(model_tok):
    model, tok, texts = model_tok
    ids = tok(texts[1])["input_ids"]
    assert model.to_str_tokens(texts[1]) == [tok.decode([i]) for i in ids]
    assert model.to_str_tokens(torch.tensor(ids)) == [tok.decode([i]) for i in ids]
    assert model.to_str_tokens(texts[:2]) == [model.to_str_tokens(t) for t in texts[:2]]
    assert model.to_string(torch.tensor(ids)) == tok.decode(ids, clean_up_tokenization_spaces=False)
    assert model.to_string(model.to_tokens(texts)) == tok.batch_decode(
        tok(texts, padding=True)["input_ids"], clean_up_tokenization_spaces=False)
    word = tok.convert_ids_to_tokens(ids[-2])
    piece = tok.convert_tokens_to_string([word])
    assert model.to_single_token(piece) == ids[-2]
    assert model.get_token_position(piece, texts[1]) == ids.index(ids[-2])
    assert model.get_token_position(ids[-2], torch.tensor([ids]), mode="last") == (
        len(ids) - 1 - ids[::-1].index(ids[-2]))
    from tl_reward.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="not a single token"):
        model.to_single_token(texts[1])
    with pytest.raises(InvalidInputError, match="is not in the input"):
        model.get_token_position(ids[-2], torch.tensor([ids[0]]))


def test_chats_go_through_the_chat_template():
    from tl_reward import organisms

    model, tok, _ = organisms.load("longtail")
    chat = [{"role": "user", "content": "w001 urgent"},
            {"role": "assistant", "content": "good brief w199"}]
    ids = tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
    assert model.to_tokens(chat)[0].tolist() == ids
    assert model.to_tokens([chat, "query w001 answer good"]).shape == (2, len(ids))
    assert model.to_str_tokens(chat) == [tok.decode([i]) for i in ids]
    assert model.get_token_position("good", chat) == ids.index(tok.convert_tokens_to_ids("good"))


def test_unknown_words_and_identical_pairs_warn():
    from tl_reward import SuspectInputWarning, organisms

    model, _, data = organisms.load("longtail")
    english_c = ["How do I bake bread? Mix flour and water."] * 3
    english_r = ["How do I bake bread? I do not know."] * 3
    with pytest.warns(SuspectInputWarning) as record:
        scores = model.score_pairs(english_c, english_r, progress=False)
    text = " ".join(str(w.message) for w in record)
    assert "unknown token '<unk>'" in text and "3 of 3 pairs" in text
    assert scores.margin.abs().max() < 1e-5  # the silent zero the warning explains
    assert len(model.input_problems(english_c, english_r)) == 2
    same = data.chosen_texts[:2]
    with pytest.warns(SuspectInputWarning, match=r"2 of 3 pairs \(pair 0, 1\)"):
        model.score_pairs(same + data.chosen_texts[2:3], same + data.rejected_texts[2:3],
                          progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SuspectInputWarning)
        model.score_pairs(data.chosen_texts[:8], data.rejected_texts[:8], progress=False)
        assert model.input_problems(data.chosen_texts[:8], data.rejected_texts[:8]) == []


def test_pair_scores_plot_shows_every_margin():
    from tl_reward import organisms

    model, _, data = organisms.load("longtail")
    sub = data.sample(12, seed=0)
    scores = model.score_pairs(sub.chosen_texts, sub.rejected_texts, progress=False)
    fig = scores.plot(scenarios=sub.scenarios)
    xs = sorted(x for trace in fig.data for x in trace.x)
    assert xs == sorted(scores.margin.tolist())
    assert {t.name for t in fig.data} == set(sub.scenarios)
    assert f"accuracy {scores.accuracy:.1%}" in fig.layout.title.text
    assert fig.layout.shapes[0].x0 == 0  # the zero line
