"""Answer-preserving trimming (spec architecture.md §6): property tests with hypothesis on random multi-turn samples,
cross-checked against the tokenizer module's own chat encoding."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from zaya_lib.data.tasks import make_problems
from zaya_lib.data.tokenizer import chat_ids, encode_chat, encode_messages
from zaya_lib.data.trimming import (chat_turns, encode_turns, irreducible_len, split_thinking, trim, trim_per_budget,
                                    trim_samples)

from _helpers import problem_tokenizer

WORDS = ["the", "answer", "is", "so", "we", "add", "carry", "one", "then", "check", "x", "=", "+", "12", "7", "."]


@pytest.fixture(scope="module")
def tok():
    probs = make_problems("add", 40, seed=3, difficulty=3) + make_problems("count_letter", 40, seed=3, difficulty=2)
    return problem_tokenizer(probs, [" ".join(WORDS)] * 20, vocab_size=400)


text = st.lists(st.sampled_from(WORDS), min_size=0, max_size=12).map(" ".join)
long_text = st.lists(st.sampled_from(WORDS), min_size=0, max_size=40).map(" ".join)
assistant = st.builds(lambda c, t: {"role": "assistant", "content": c, "thinking": t},
                      text, st.one_of(st.none(), long_text))
user = st.builds(lambda c: {"role": "user", "content": c}, text)
samples = st.lists(st.tuples(user, assistant), min_size=1, max_size=3).map(lambda ps: [t for p in ps for t in p])
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def as_messages(turns, with_thinking=True):
    """Turns -> the tokenizer module's messages (think block folded into the content as the chat format writes it)."""
    out = []
    for t in turns:
        c = t["content"]
        if with_thinking and t.get("thinking") is not None:
            c = f"<think>{t['thinking']}</think>{c}"
        out.append({"role": t["role"], "content": c})
    return out


def parse(ids, cid):
    """Output ids -> per turn (role id, thinking ids or None, content ids), splitting at <|end|>."""
    assert ids[0] == cid.bos
    turns, cur = [], []
    for x in ids[1:]:
        if x == cid.end:
            role, body = cur[0], cur[1:]
            if body and body[0] == cid.think:
                j = body.index(cid.end_think)
                turns.append((role, body[1:j], body[j + 1:]))
            else:
                turns.append((role, None, body))
            cur = []
        else:
            cur.append(x)
    assert cur == []
    return turns


@SETTINGS
@given(turns=samples, data=st.data())
def test_trim_properties(tok, turns, data):
    cid = chat_ids(tok)
    enc = encode_turns(tok, turns, cid)
    full_ids, full_mask = encode_messages(tok, as_messages(turns))
    assert enc.render() == (full_ids, full_mask)          # piecewise encoding == the tokenizer's chat encoding
    # what trimming can never remove (answers, questions, markers; the last think markers stay), computed
    # independently from the tokenizer's encoding of the sample with its thinking removed
    no_think = len(encode_messages(tok, as_messages(turns, with_thinking=False))[0])
    last_has_think = turns[-1]["thinking"] is not None
    irreducible = no_think + 2 * last_has_think
    assert irreducible_len(enc) == irreducible
    # budgets below the irreducible part, between it and the full length, or above: dropped, trimmed, kept all occur
    # (the trimming range first: hypothesis favours the first choice)
    ranges = [(irreducible, len(full_ids) - 1), (max(1, irreducible - 3), irreducible - 1),
              (len(full_ids), len(full_ids) + 3)]
    lo, hi = data.draw(st.sampled_from([r for r in ranges if r[0] <= r[1]]), label="budget range")
    budget = data.draw(st.integers(lo, hi), label="budget")
    r = trim(enc, budget)
    event(r.status)

    # dropping happens iff the non-thinking part alone exceeds C    assert (r.status == "dropped") == (irreducible > budget)
    if r.status == "dropped":
        assert r.ids is None
        return

    assert len(r.ids) <= budget and len(r.loss_mask) == len(r.ids)
    if len(full_ids) <= budget:                             # fits: unchanged, byte for byte
        assert r.status == "kept" and (r.ids, r.loss_mask) == (full_ids, full_mask)
        return
    assert r.status == "trimmed" and r.tokens_removed == len(full_ids) - len(r.ids) > 0

    out = parse(r.ids, cid)
    orig = parse(full_ids, cid)
    assert [o[0] for o in out] == [o[0] for o in orig]
    kept_earlier = []
    for k, ((_, th, ans), (_, th0, ans0)) in enumerate(zip(out, orig)):
        assert ans == ans0                                  # every answer (and question) survives verbatim
        if th0 is None:
            assert th is None
        elif k == len(orig) - 1:                            # last assistant turn: markers kept, head of thinking kept
            assert th is not None and th == th0[:len(th)]
        else:                                               # earlier turns: block whole or dropped
            assert th is None or th == th0
            kept_earlier.append(th is not None)
    # earlier blocks go oldest first: the dropped ones are a prefix of the earlier think blocks
    assert kept_earlier == sorted(kept_earlier)
    # the budget is used up whenever the last thinking was cut (trimming is minimal)
    if last_has_think and len(out[-1][1]) < len(orig[-1][1]):
        assert len(r.ids) == budget
    # loss mask: 1 exactly on assistant bodies (the tokens after <|assistant|>, its <|end|> included)
    want_mask = [int(role == cid.assistant) for role in _roles_before(r.ids, cid)]
    assert r.loss_mask == want_mask


def _roles_before(ids, cid):
    """For each position, the role marker of the turn it sits in (None on <bos> and on role markers themselves)."""
    role, out = None, []
    for x in ids:
        out.append(role)
        if x in (cid.user, cid.assistant, cid.system):
            role = x
        elif x == cid.end:
            role = None
    return out


def test_trim_real_task_sample(tok):
    """A real reasoning sample: trimming keeps `\\boxed{answer}` whole and cuts the END of the chain of thought."""
    p = make_problems("add", 1, seed=11, difficulty=5)[0]
    cid = chat_ids(tok)
    enc = encode_turns(tok, chat_turns(p.question, p.response()), cid)
    full, _ = encode_chat(tok, p.question, p.response())
    assert enc.render()[0] == full
    think = tok.encode(p.cot, add_special_tokens=False)
    budget = len(full) - len(think) // 2                     # room for about half the thinking
    r = trim(enc, budget)
    assert r.status == "trimmed" and len(r.ids) == budget
    text = tok.decode(r.ids)
    assert text.endswith(f"</think>\\boxed{{{p.answer}}}<|end|>")
    kept = r.ids[r.ids.index(cid.think) + 1: r.ids.index(cid.end_think)]
    assert kept == think[:len(kept)] and 0 < len(kept) < len(think)


def test_trim_per_budget_monotone(tok):
    """Re-trimming per stage (4K -> 32K -> 131K, scaled down) starts from the originals: larger budgets keep more."""
    probs = make_problems("add", 30, seed=5, difficulty=4) + make_problems("count_letter", 30, seed=5, difficulty=4)
    encs = [encode_turns(tok, chat_turns(p.question, p.response())) for p in probs]
    budgets = [24, 40, 64, 4096]
    res = trim_per_budget(encs, budgets)
    outs = [s.tokens_out for _, s in res.values()]
    dropped = [s.dropped for _, s in res.values()]
    assert outs == sorted(outs) and dropped == sorted(dropped, reverse=True)
    last = res[4096][1]
    assert last.kept == len(encs) and last.tokens_removed == 0
    mid = res[40][1].as_dict()
    assert mid["trimmed"] > 0 and mid["samples"] == len(encs)
    assert mid["tokens_in"] == mid["tokens_out"] + mid["tokens_removed"] + mid["tokens_dropped"]
    with pytest.raises(ValueError, match="positive"):
        trim_per_budget(encs, [64, 0])


def test_multi_turn_drops_oldest_thinking_first(tok):
    cid = chat_ids(tok)
    long = " ".join(["we add one then check"] * 6)
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "12", "thinking": long},
             {"role": "user", "content": "x"}, {"role": "assistant", "content": "7", "thinking": long},
             {"role": "user", "content": "x"}, {"role": "assistant", "content": "the answer", "thinking": long}]
    enc = encode_turns(tok, turns, cid)
    block = len(enc.turns[1].thinking) + 2
    # room for exactly one earlier block plus an empty last block: the OLDEST goes, the second is kept whole
    budget = irreducible_len(enc) + block
    r = trim(enc, budget)
    out = parse(r.ids, cid)
    assert r.blocks_dropped == 1 and out[1][1] is None and out[3][1] == enc.turns[3].thinking and out[5][1] == []
    assert len(r.ids) == budget


def test_bad_input(tok):
    enc = encode_turns(tok, chat_turns("q", "<think>a</think>b"))
    with pytest.raises(ValueError, match="budget must be positive"):
        trim(enc, 0)
    with pytest.raises(ValueError, match="role 'bot'"):
        encode_turns(tok, [{"role": "bot", "content": "hi"}])
    with pytest.raises(ValueError, match="only assistant turns"):
        encode_turns(tok, [{"role": "user", "content": "hi", "thinking": "hmm"}])
    with pytest.raises(ValueError, match="at least one turn"):
        encode_turns(tok, [])
    results, stats = trim_samples([enc], 1)
    assert results[0].status == "dropped" and stats.dropped == 1 and stats.tokens_dropped == len(enc)


def test_split_thinking():
    assert split_thinking("<think>a b</think>\\boxed{3}") == ("a b", "\\boxed{3}")
    assert split_thinking("\\boxed{3}") == (None, "\\boxed{3}")
    assert split_thinking("<think>unfinished") == ("unfinished", "")
