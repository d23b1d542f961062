"""Tokenizer: round-trips, digit splitting, special ids, vocab padding, chat template vs encode_chat, save/load."""
import pytest
from hypothesis import given, settings, strategies as st

from zaya_lib.data.tasks import make_problems
from zaya_lib.data.tokenizer import (
    CHAT_TEMPLATE, SPECIAL_TOKENS, VOCAB_MULTIPLE, encode_chat, encode_document, encode_messages, load_tokenizer,
    render_chat, save_tokenizer, train_tokenizer,
)


def _corpus():
    import inspect, json, textwrap  # real English prose and code that ship with Python
    import pydoc_data.topics as topics
    texts = list(topics.topics.values())[:200]
    texts += [inspect.getsource(m) for m in (json, textwrap)]
    texts += [p.question + " " + p.response() for p in make_problems("add", 300, seed=1, difficulty=3)]
    return texts


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(_corpus(), vocab_size=1500)


def test_special_ids_and_vocab_padding(tok):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.pad_token_id == 0 and tok.eos_token == "<|end|>" and tok.bos_token == "<bos>"
    assert tok.padding_side == "left"
    assert len(tok) % VOCAB_MULTIPLE == 0
    # the BPE learnt merges: far more than bytes+specials, and at most the target plus padding
    assert 256 + len(SPECIAL_TOKENS) < len(tok) <= 1500 + VOCAB_MULTIPLE - 1


@pytest.mark.parametrize("text", [
    "Hello, world! The quick brown fox.",
    "def f(x):\n    return {'a': [1, 2]}  # comment\n\ttab",
    "naïve café — 日本語 🙂 ∑ x² ≤ 10",
    "<think>2+9=11 c1 →861</think>\\boxed{861}",
    "   leading and trailing spaces   \n\n",
    "1234567890 3.14159 -42 1e10",
])
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_round_trip_any_unicode(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_digits_are_single_tokens(tok):
    for text in ["12345678901234567890", "x=987654 and 1000000", " 42"]:
        pieces = tok.convert_ids_to_tokens(tok.encode(text, add_special_tokens=False))
        digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
        assert all(len(p) == 1 for p in digit_pieces), pieces
        assert len(digit_pieces) == sum(c.isdigit() for c in text)


def test_special_tokens_in_text_are_single_ids(tok):
    ids = tok.encode("<think>ab</think><|end|>", add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<think>")
    assert tok.convert_tokens_to_ids("</think>") in ids and ids[-1] == tok.convert_tokens_to_ids("<|end|>")


def test_chat_template_and_assistant_mask(tok):
    q, r = "Compute 472+389.", "<think>2+9=11 c1 7+8+1=16 c1 4+3+1=8 →861</think>\\boxed{861}"
    text = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": r}], tokenize=False)
    assert text == f"<bos><|user|>{q}<|end|><|assistant|>{r}<|end|>" == render_chat(q, r)
    prompt = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<bos><|user|>{q}<|end|><|assistant|>" == render_chat(q)

    ids, mask = encode_chat(tok, q, r)
    assert ids == tok.encode(text, add_special_tokens=False)  # piecewise build == tokenising the rendered string
    assert len(mask) == len(ids)
    masked = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(masked) == r + "<|end|>"  # exactly the response and its closing <|end|>
    assert mask == sorted(mask)  # one contiguous span at the end
    # TRL reads the {% generation %} markers; its mask must agree with ours
    out = tok.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": r}],
                                  return_assistant_tokens_mask=True, return_dict=True)
    assert out["input_ids"] == ids and out["assistant_masks"] == mask

    p_ids, p_mask = encode_chat(tok, q)
    assert p_ids == tok.encode(prompt, add_special_tokens=False) and sum(p_mask) == 0
    assert ids[:len(p_ids)] == p_ids  # the prompt is a prefix of the full chat


def test_multi_turn_mask_and_bad_role(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b1"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    ids, mask = encode_messages(tok, msgs)
    assert ids == tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "b1<|end|>d<|end|>"
    with pytest.raises(ValueError, match="tool"):
        encode_messages(tok, [{"role": "tool", "content": "x"}])


def test_document_encoding(tok):
    ids = encode_document(tok, "Hello 12")
    assert ids[0] == tok.convert_tokens_to_ids("<bos>") and ids[-1] == tok.convert_tokens_to_ids("<eos>")
    assert tok.decode(ids[1:-1]) == "Hello 12"


def test_save_load_atomic(tok, tmp_path):
    d = tmp_path / "tok"
    save_tokenizer(tok, d)
    save_tokenizer(tok, d)  # overwriting an existing directory works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temp dirs left behind
    t2 = load_tokenizer(d)
    s = "<bos><|user|>hi 123<|end|><|assistant|><think>x</think>\\boxed{7}<|end|>"
    assert t2.encode(s, add_special_tokens=False) == tok.encode(s, add_special_tokens=False)
    assert len(t2) == len(tok) and t2.chat_template == CHAT_TEMPLATE and t2.padding_side == "left"
    assert t2.eos_token == "<|end|>" and t2.pad_token_id == 0


def test_load_missing_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)
