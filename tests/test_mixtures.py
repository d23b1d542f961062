"""Mixtures: normalisation over nonzero weights, validation errors, deterministic sampling that meets its budget."""
import math

import pytest

from zaya_lib.data.corpora import build_corpora
from zaya_lib.data.mixtures import MIXTURES, resolve_mixture, sample_mixture


@pytest.fixture(scope="module")
def corpora():
    return build_corpora({"web": 40, "code": 40, "math": 80, "instruct": 40}, seed=0)


def test_normalisation():
    for name in MIXTURES:
        w = resolve_mixture(name)
        assert math.isclose(sum(w.values()), 1.0) and all(v > 0 for v in w.values())
    w = resolve_mixture({"web": 0, "code": 1, "math": 3})
    assert w == {"code": 0.25, "math": 0.75}  # zero entries are dropped, the rest renormalised
    assert "web" not in resolve_mixture("sft")
    p1, p2 = resolve_mixture("pretrain_phase1"), resolve_mixture("pretrain_phase2")
    assert p2["code"] > p1["code"] and p2["math"] > p1["math"] and p2["instruct"] > p1["instruct"]


@pytest.mark.parametrize("mix,msg", [
    ("pretrain_phase9", "unknown mixture 'pretrain_phase9'"),
    ({"web": 1, "poetry": 1}, "unknown category 'poetry'"),
    ({"web": 1, "code": -0.5}, "weight of 'code' is negative"),
    ({"web": 0, "code": 0}, "all weights are zero"),
    ({"web": float("nan")}, "finite number"),
    ({"web": "1"}, "finite number"),
])
def test_validation(mix, msg):
    with pytest.raises(ValueError, match=msg):
        resolve_mixture(mix)


def test_sample_docs_exact_and_deterministic(corpora):
    ds, counts = sample_mixture(corpora, "pretrain_phase1", n_docs=100, seed=1)
    assert len(ds) == 100
    by_cat = {c: ds["category"].count(c) for c in set(ds["category"])}
    assert by_cat == {"web": 50, "code": 20, "math": 20, "instruct": 10}
    ds2, counts2 = sample_mixture(corpora, "pretrain_phase1", n_docs=100, seed=1)
    assert ds["text"] == ds2["text"] and counts == counts2
    ds3, _ = sample_mixture(corpora, "pretrain_phase1", n_docs=100, seed=2)
    assert ds["text"] != ds3["text"]
    # web (40 docs) is asked for 50: the corpus is cycled, each doc used once before any repeats
    web = [t for t, c in zip(ds["text"], ds["category"]) if c == "web"]
    assert len(set(web)) == 40


def test_sample_tokens_meets_shares(corpora):
    from zaya_lib.data.tokenizer import train_tokenizer
    tok = train_tokenizer((t for d in corpora.values() for t in d["text"]), vocab_size=800)
    budget = 40_000
    ds, counts = sample_mixture(corpora, "pretrain_phase2", n_tokens=budget, seed=0, tokenizer=tok)
    w = resolve_mixture("pretrain_phase2")
    longest = {c: max(len(tok(t)["input_ids"]) + 2 for t in corpora[c]["text"]) for c in w}
    for c, share in w.items():
        # each category stops on the first document that reaches its share: overshoot < one document
        assert share * budget <= counts[c] < share * budget + longest[c]
    got = {c: sum(len(tok(t)["input_ids"]) + 2 for t, cc in zip(ds["text"], ds["category"]) if cc == c) for c in w}
    assert got == counts  # reported counts are what the dataset holds


def test_sample_errors(corpora):
    with pytest.raises(ValueError, match="exactly one"):
        sample_mixture(corpora, "sft", seed=0)
    with pytest.raises(ValueError, match="'web'"):
        sample_mixture({"math": corpora["math"]}, "pretrain_phase1", n_docs=10)
    with pytest.raises(ValueError, match="unknown mixture"):
        sample_mixture(corpora, "nope", n_docs=10)
