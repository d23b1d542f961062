"""Corpora: every category non-empty, real, deterministic; public-dataset loaders on local files in their schema."""
import json

import pytest
from datasets import Dataset

from zaya_lib.data.corpora import (
    CATEGORIES, FEATURES, build_corpora, code_corpus, instruct_corpus, load_openmathreasoning, load_rstar_coder,
    math_corpus, web_corpus,
)

N = 60


@pytest.fixture(scope="module")
def corpora():
    return build_corpora(N, seed=0)


def test_categories_nonempty_and_schema(corpora):
    assert sorted(corpora) == sorted(CATEGORIES)
    for cat, ds in corpora.items():
        assert len(ds) == N and ds.features == FEATURES
        assert set(ds["category"]) == {cat}
        assert all(len(t) > 20 for t in ds["text"]), cat
        assert not any("<bos>" in t or "<eos>" in t for t in ds["text"])  # wrapped later, once


def test_web_is_english_prose(corpora):
    texts = corpora["web"]["text"]
    common = {"the", "of", "and", "to", "is", "a", "in"}
    for t in texts:
        words = t.lower().split()
        # English function words are >= 8% of the words of real English prose (typically 15-25%); code is far lower
        assert sum(w in common for w in words) / len(words) > 0.08, t[:200]
    assert len({s.split(":")[0] for s in corpora["web"]["source"]}) >= 3  # several kinds of source mixed


def test_web_does_not_depend_on_installed_packages(monkeypatch):
    """The first ~1,100 web documents come from the Python installation alone (reference manual, stdlib text files and
    docstrings), so no installed package can change them; only past those does the corpus read the pinned packages'
    docstrings (`_DOC_PACKAGES`), and never anything else installed."""
    from zaya_lib.data import corpora as C

    assert C._DOC_PACKAGES == ("torch", "numpy", "sympy")
    head = web_corpus(600, seed=5)
    assert not any(s.startswith("pkg-") for s in head["source"])
    monkeypatch.setattr(C, "_package_files", lambda: ())  # as if no package were installed at all
    assert web_corpus(600, seed=5)["text"] == head["text"]


def test_code_is_python(corpora):
    import ast
    texts = corpora["code"]["text"]
    kw = ("def ", "import ", "return", "class ", "self", " = ")
    assert sum(any(k in t for k in kw) for t in texts) >= 0.9 * len(texts)
    # whole files parse; chunks mostly do not (cut at blank lines) but their lines are plausible code
    assert all(t.isprintable() or "\n" in t for t in texts)


def test_chats_well_formed(corpora):
    for cat in ("math", "instruct"):
        for r in corpora[cat]:
            assert r["messages"] and r["messages"][-1]["role"] == "assistant"
            assert r["text"].startswith(("<|user|>", "<|system|>")) and r["text"].endswith("<|end|>")
    for r in corpora["math"]:
        resp = r["messages"][-1]["content"]
        assert resp.startswith("<think>") and resp.endswith("\\boxed{" + r["answer"] + "}")


def test_instruct_replies_follow_instructions():
    ds = instruct_corpus(300, seed=1, p_task=0.0, p_two_turn=0.0, p_system=0.0)
    checked = 0
    for m in ds["messages"]:
        q, r = m[0]["content"], m[1]["content"]
        if q.startswith("Repeat the word"):
            w = q.split()[3]
            assert set(r.split()) == {w}; checked += 1
        elif q.startswith("Write in uppercase: "):
            assert r == q.split(": ", 1)[1].upper(); checked += 1
        elif q.startswith("Spell the word"):
            assert r == q.split()[3][::-1]; checked += 1
        elif "JSON" in q:
            assert json.loads(r)["answer"] == eval(q.split()[2].rstrip("?")); checked += 1
    assert checked > 50


def test_deterministic():
    for f in (web_corpus, code_corpus, math_corpus, instruct_corpus):
        a, b, c = f(25, seed=3), f(25, seed=3), f(25, seed=4)
        assert a["text"] == b["text"], f.__name__
        assert a["text"] != c["text"], f.__name__


def test_math_nothink_share_keeps_the_problems():
    """A share of chats answers without reasoning (`<think></think>\\boxed{a}`); the problems, their order and the
    reasoning chats themselves are those of the all-thinking corpus, so the share is the only thing that changes."""
    base, mixed = math_corpus(400, seed=2), math_corpus(400, seed=2, nothink_frac=0.5)
    assert [m[0] for m in base["messages"]] == [m[0] for m in mixed["messages"]]  # same questions, same order
    n_nothink = 0
    for b, m, src, ans in zip(base["messages"], mixed["messages"], mixed["source"], mixed["answer"]):
        if m[1]["content"].startswith("<think></think>"):
            n_nothink += 1
            assert m[1]["content"] == f"<think></think>\\boxed{{{ans}}}" and src.endswith(":nothink")
        else:
            assert m[1] == b[1] and not src.endswith(":nothink")
    # binomial(400, 0.5): sd 10, so [160, 240] is a 4-sd band
    assert 160 <= n_nothink <= 240
    assert not any(m[1]["content"].startswith("<think></think>") for m in base["messages"])
    with pytest.raises(ValueError, match="nothink_frac"):
        math_corpus(10, nothink_frac=1.5)
    # restricted to some task families: the others always reason
    only = math_corpus(400, seed=2, nothink_frac=0.5, nothink_tasks=["div"])
    skipped = {src.split(":")[1] for src in only["source"] if src.endswith(":nothink")}
    assert skipped == {"div"}
    with pytest.raises(ValueError, match="unknown nothink_tasks.*'divide'"):
        math_corpus(10, nothink_frac=0.5, nothink_tasks=["divide"])


def test_bad_sizes():
    with pytest.raises(ValueError, match="n must be a positive int"):
        math_corpus(0)
    with pytest.raises(ValueError, match="unknown corpus categories"):
        build_corpora({"poetry": 3})


# ---- public datasets, from small local files in the published schemas --------------------------------------------

def test_openmathreasoning_local_parquet(tmp_path):
    rows = [
        {"expected_answer": "5", "problem_type": "has_answer_extracted", "problem_source": "aops_c4",
         "generation_model": "DeepSeek-R1", "pass_rate_72b_tir": "0.5", "problem": "Find x if 2x=10.",
         "generated_solution": "<think>\n2x=10 so x=5.\n</think>\nThe answer is $\\boxed{5}$.", "inference_mode": "cot"},
        {"expected_answer": "12", "problem_type": "has_answer_extracted", "problem_source": "aops_c6",
         "generation_model": "QwQ-32B", "pass_rate_72b_tir": "n/a", "problem": "Compute 3*4.",
         "generated_solution": "<think>3*4 is 12</think>\nSo 12.", "inference_mode": "cot"},
        {"expected_answer": "1", "problem_type": "x", "problem_source": "y", "generation_model": "z",
         "pass_rate_72b_tir": "1", "problem": "tir row", "generated_solution": "code...", "inference_mode": "tir"},
    ]
    path = tmp_path / "omr.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    ds = load_openmathreasoning(str(path))
    assert len(ds) == 2 and ds.features == FEATURES  # the tir row is filtered out
    r0, r1 = ds[0], ds[1]
    assert r0["category"] == "math" and r0["answer"] == "5" and r0["source"] == "openmathreasoning:aops_c4"
    assert r0["messages"][0] == {"role": "user", "content": "Find x if 2x=10."}
    assert r0["messages"][1]["content"] == "<think>2x=10 so x=5.</think>The answer is $\\boxed{5}$."
    assert r1["messages"][1]["content"].endswith("So 12.\n\\boxed{12}")  # box appended when missing
    assert r0["text"].startswith("<|user|>Find x") and r0["text"].endswith("<|end|>")
    assert len(load_openmathreasoning(str(path), inference_mode=None)) == 3
    assert len(load_openmathreasoning(str(tmp_path), n=1)) <= 1  # a folder of parquet files works too


def test_rstar_coder_local_jsonl(tmp_path):
    synth = [
        {"question": "Read n and print n*2.", "seed_question": "...", "seed_source": "codeforces",
         "response": "<think>double it</think>\nHere is the code.", "code": "n=int(input())\nprint(n*2)"},
        {"question": "Print hi.", "seed_question": "...", "seed_source": "taco",
         "response": "<think>easy</think>\n```python\nprint('hi')\n```", "code": "print('hi')"},
    ]
    p = tmp_path / "synthetic_sft.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in synth))
    ds = load_rstar_coder(str(p))
    assert len(ds) == 2 and set(ds["category"]) == {"code"} and ds.features == FEATURES
    a0 = ds[0]["messages"][1]["content"]
    assert a0.startswith("<think>double it</think>") and a0.endswith("```python\nn=int(input())\nprint(n*2)\n```")
    assert ds[1]["messages"][1]["content"].count("print('hi')") == 1  # code already in the response: not repeated
    assert ds[0]["source"] == "rstar-coder:codeforces"

    seed = [{"question_id": "q1", "question": "Add two numbers.", "starter_code": "def add(a, b):",
             "response": "<think>sum</think>def add(a, b): return a + b", "verified": True, "is_passed": True},
            {"question_id": "q2", "question": "Bad.", "starter_code": "", "response": "wrong", "verified": False,
             "is_passed": False}]
    p2 = tmp_path / "seed.parquet"
    Dataset.from_list(seed).to_parquet(str(p2))
    ds2 = load_rstar_coder(str(p2), config="seed_sft")
    assert len(ds2) == 1 and "Starter code:" in ds2[0]["messages"][0]["content"]  # failing row dropped
    assert len(load_rstar_coder(str(p2), config="seed_sft", only_verified=False)) == 2


def test_loader_errors(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="missing columns"):
        load_openmathreasoning(str(p))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet"):
        load_rstar_coder(str(tmp_path / "empty"))
