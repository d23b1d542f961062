"""SFT (issue 5): assistant-only loss, BFD packing without splits, RoPE base in checkpoints, early validation."""
import random

import pytest
import torch
import torch.nn.functional as F

from zaya_lib.data.corpora import instruct_corpus, math_corpus
from zaya_lib.data.tasks import make_problems
from zaya_lib.data.tokenizer import chat_ids, train_tokenizer
from zaya_lib.model.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from zaya_lib.train import sft
from zaya_lib.train.evaluate import evaluate_aggregation

from _helpers import tiny_model


@pytest.fixture(scope="module")
def tok():
    texts = list(math_corpus(200, seed=1)["text"]) + list(instruct_corpus(200, seed=1)["text"])
    return train_tokenizer(texts, vocab_size=384)


def _chats(n=40, seed=0):
    return list(math_corpus(n, seed=seed)["messages"]) + list(instruct_corpus(n, seed=seed)["messages"])


def _assistant_span_mask(ids, ids_):
    """Independent reference: 1 on tokens after `<|assistant|>` up to and including its `<|end|>`, by scanning."""
    out, inside = [], False
    for t in ids:
        out.append(int(inside))
        if t == ids_.assistant:
            inside = True
        elif t == ids_.end and inside:
            inside = False
    return out


def test_labels_are_minus_100_exactly_outside_assistant_spans(tok):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 12+30?"},
            {"role": "assistant", "content": "<think>2+0=2 1+3=4 →42</think>\\boxed{42}"},
            {"role": "user", "content": "Spell cat backwards."}, {"role": "assistant", "content": "tac"}]
    samples, stats = sft.trimmed_chat_samples(tok, [msgs] + _chats(10), budget=255)
    assert stats.dropped == 0
    data, packed = sft.pack_sft_data({"reasoning": samples}, seq_len=255, pad_id=tok.pad_token_id)
    labels = sft.sft_labels(data.tokens_NT1, data.loss_mask_NT1)
    ids_ = chat_ids(tok)
    n_checked = 0
    for w in range(len(data)):
        ids = data.tokens_NT1[w].tolist()
        ref = _assistant_span_mask(ids, ids_)
        for t in range(len(ids) - 1):
            want = ids[t + 1] if ref[t + 1] else -100  # target t is token t+1: an assistant token or nothing
            assert int(labels[w, t]) == want, (w, t)
            n_checked += ref[t + 1]
    assert n_checked > 100  # plenty of assistant targets were checked, not just -100s
    # the multi-turn chat: both assistant replies (and their <|end|>) carry loss, the system/user turns none
    first = next(w for w, spans in enumerate(packed.boundaries) for s in spans if s[2] == 0)
    start, end, _ = next(s for s in packed.boundaries[first] if s[2] == 0)
    targets = [int(x) for x in labels[first, start:end - 1] if x != -100]
    want = "<think>2+0=2 1+3=4 →42</think>\\boxed{42}<|end|>tac<|end|>"
    assert tok.decode(targets, skip_special_tokens=False) == want


def test_gradients_do_not_depend_on_non_assistant_targets(tok):
    samples, _ = sft.trimmed_chat_samples(tok, _chats(8), budget=127)
    data, _ = sft.pack_sft_data({"reasoning": samples}, seq_len=127, pad_id=tok.pad_token_id)
    model = tiny_model(tok)
    x = data.tokens_NT1[:, :-1]

    def grads(target_ids):
        model.zero_grad()
        logits = model(x).logits
        logits.retain_grad()
        labels = sft.sft_labels(target_ids, data.loss_mask_NT1)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100).backward()
        return [p.grad.clone() for p in model.parameters()], logits.grad

    g0, lg = grads(data.tokens_NT1)
    # every logit row whose target is not an assistant token gets exactly zero gradient
    assert torch.all(lg[data.loss_mask_NT1[:, 1:] == 0] == 0)
    assert torch.all(lg[data.loss_mask_NT1[:, 1:] == 1].abs().sum(-1) > 0)
    # replace every non-assistant target (user/system text, markers, padding) by random ids: same gradient, bit for bit
    other = data.tokens_NT1.clone()
    user = data.loss_mask_NT1 == 0
    other[user] = torch.randint(0, len(tok), (int(user.sum()),), generator=torch.Generator().manual_seed(0))
    g1, _ = grads(other)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    # ... while changing ONE assistant target does change it (the comparison above can fail)
    other = data.tokens_NT1.clone()
    w, t = (data.loss_mask_NT1 == 1).nonzero()[5].tolist()
    other[w, t] = (other[w, t] + 1) % len(tok)
    g2, _ = grads(other)
    assert not all(torch.equal(a, b) for a, b in zip(g0, g2))


def test_trainer_applies_the_same_mask(tok):
    from zaya_lib.train.trainer import TrainConfig, train

    samples, _ = sft.trimmed_chat_samples(tok, _chats(12), budget=127)
    data, _ = sft.pack_sft_data({"reasoning": samples[:12], "instruct": samples[12:]}, seq_len=127,
                                pad_id=tok.pad_token_id)
    model = tiny_model(tok)
    with torch.no_grad():
        logits = model(data.tokens_NT1[:, :-1]).logits
        labels = sft.sft_labels(data.tokens_NT1, data.loss_mask_NT1)
        want = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100))
    hist = train(model, data, TrainConfig(steps=1, batch_size=len(data), log_every=1, warmup_steps=0), resume=False)
    # the logged loss is the forward loss of the step, before the update: fp32 mean over the same targets
    assert abs(hist[0]["loss"] - want) < 1e-4 * want
    cats = hist[0]["loss_per_category"]
    assert cats["reasoning"] is not None and cats["instruct"] is not None and cats["aggregation"] is None


def test_packing_keeps_samples_whole_and_fills_windows(tok):
    chats = _chats(60, seed=3)
    samples, _ = sft.trimmed_chat_samples(tok, chats, budget=200)
    by_cat = {"reasoning": samples[:60], "instruct": samples[60:]}
    data, packed = sft.pack_sft_data(by_cat, seq_len=199, pad_id=tok.pad_token_id, seed=1)
    flat = [s for c in by_cat for s in by_cat[c]]
    assert data.tokens_NT1.shape[1] == 200
    # the packer saw a shuffled order; map every placed sample back by content and check it is intact and unique
    seen = []
    for w, spans in enumerate(packed.boundaries):
        for start, end, _ in spans:
            ids = data.tokens_NT1[w, start:end].tolist()
            mask = data.loss_mask_NT1[w, start:end].tolist()
            assert ids[0] == chat_ids(tok).bos  # a window holds whole samples, each opening with <bos>
            seen.append((tuple(ids), tuple(mask)))
    assert sorted(seen) == sorted((tuple(i), tuple(m)) for i, m in flat)  # each sample exactly once, never split
    # windows are filled: BFD leaves less room than the lower bound of ceil(total / W) windows allows to waste
    total = sum(len(i) for i, _ in flat)
    assert len(packed) <= -(-total // 200) + 1
    assert packed.fill_ratio > 0.9
    # a sample longer than the window is an error (it should have been AP-trimmed), naming the problem
    with pytest.raises(ValueError, match="do not fit a window of 200 tokens"):
        sft.pack_sft_data({"reasoning": [([1] * 201, [1] * 201)]}, seq_len=199)


def test_trimming_keeps_the_answer_when_the_window_is_short(tok):
    p = make_problems("add", 1, seed=0, difficulty=5)[0]
    msgs = [{"role": "user", "content": p.question}, {"role": "assistant", "content": p.response()}]
    full, _ = sft.trimmed_chat_samples(tok, [msgs], budget=10_000)
    short, stats = sft.trimmed_chat_samples(tok, [msgs], budget=len(full[0][0]) - 10)
    assert stats.trimmed == 1 and len(short[0][0]) == len(full[0][0]) - 10
    text = tok.decode(short[0][0], skip_special_tokens=False)
    assert text.endswith(f"</think>\\boxed{{{p.answer}}}<|end|>")  # the answer survives verbatim


def test_rope_theta_switch_persists_in_checkpoint(tok, tmp_path):
    model = tiny_model(tok).eval()
    ids = torch.randint(9, len(tok), (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        model.set_rope_theta(5.0e5)
        after = model(ids).logits
    assert float((after - before).abs().max()) > 1e-4  # the base really changes the computation
    path = save_hf_checkpoint(model, tok, tmp_path / "checkpoints" / "sft")
    loaded, tok2 = load_hf_checkpoint(path)
    assert loaded.config.rope_theta == 5.0e5
    assert len(tok2) == len(tok)
    with torch.no_grad():
        # same weights (bit for bit) and base; the logits may differ in the last bit only, since the loaded tensors sit
        # at other addresses and BLAS picks its blocking by alignment (measured 2.4e-7), far below the 1e-4 above
        torch.testing.assert_close(loaded.eval()(ids).logits, after, rtol=0, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    # overwriting an existing checkpoint swaps it atomically and leaves no temp folders behind
    save_hf_checkpoint(loaded, tok2, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["sft"]


def test_validation_fails_at_once(tok):
    sft.check_sft_params(1024, 2, tok, agg_candidates=4, agg_tau=48, agg_ratio=0.3)  # fine
    with pytest.raises(ValueError, match="sft_agg_tau=2000: a tail longer than the window sft_seq_len=1024"):
        sft.check_sft_params(1024, 1, tok, agg_candidates=4, agg_tau=2000, agg_ratio=0.3)
    with pytest.raises(ValueError, match="sft_agg_candidates=4 tails of sft_agg_tau=250 tokens"):
        sft.check_sft_params(1024, 1, tok, agg_candidates=4, agg_tau=250, agg_ratio=0.3)
    with pytest.raises(ValueError, match="not divisible by the CP world size 3"):
        sft.check_sft_params(1024, 3)
    with pytest.raises(ValueError, match="sft_agg_ratio must be in"):
        sft.check_sft_params(1024, 1, agg_ratio=1.5)


def test_aggregation_samples_and_eval_with_the_engine(tok):
    """Expert + self aggregation examples (self candidates sampled by the real engine from a random debug model):
    loss only on the target, each fits the window; then the evaluation round runs end to end."""
    model = tiny_model(tok)
    probs = make_problems("add", 6, seed=0, difficulty=2)
    sample_fn = sft.engine_sampler(model, tok, max_new_tokens=12, temperature=1.0)
    samples, info = sft.aggregation_samples(tok, probs[:3], probs[3:], C=2, tau=8, budget=255,
                                            rng=random.Random(0), sample_fn=sample_fn)
    assert info["expert"]["examples"] == 3 and info["self"]["examples"] == 3 and len(samples) == 6
    ids_ = chat_ids(tok)
    for ids, mask in samples:
        assert len(ids) <= 255
        first = mask.index(1)
        assert ids[first - 1] == ids_.assistant and sum(mask[first:]) == len(mask) - first  # target only
    ev = evaluate_aggregation(model, tok, probs[:3], k=2, tau=8, max_new_tokens=8)
    assert ev.n_problems == 3 and all(0.0 <= v <= 1.0 for v in (ev.single, ev.aggregated, ev.majority, ev.pass_at_k))
    assert ev.pass_at_k >= ev.single and ev.pass_at_k >= ev.majority


def test_noagg_control_builds_the_same_plain_chats(monkeypatch, tmp_path):
    """The control of the aggregation experiment reads notebook 05's params and must train on exactly 05's plain
    chats: the same task families (a list) and the same no-think share, not the defaults (all tasks, all thinking)."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_chats(*args):
        seen["args"] = args
        raise Stop

    monkeypatch.setattr(sft, "checkpoint_tokenizer", lambda path: None)
    monkeypatch.setattr(sft, "plain_sft_chats", fake_chats)
    params = {"seed": 3, "sft_init_phase": "midtrain", "sft_seq_len": 64, "sft_rope_theta": 1e4, "sft_n_reasoning": 7,
              "sft_reasoning_max_difficulty": 2, "sft_n_instruct": 5, "sft_steps": 1, "sft_batch_size": 1,
              "sft_lr": 1e-3, "sft_warmup_steps": 0, "sft_reasoning_tasks": ["add", "sub"], "sft_nothink_frac": 0.25,
              "sft_nothink_tasks": ["sub"]}
    with pytest.raises(Stop):
        sft.train_noagg_variant(tmp_path, params)
    assert seen["args"] == (7, 2, 5, 3, ["add", "sub"], 0.25, ["sub"])
    # a params dict that lost one of them is an error naming it, not a silent default (all tasks, all thinking)
    with pytest.raises(KeyError, match="sft_nothink_tasks"):
        sft.train_noagg_variant(tmp_path, {k: v for k, v in params.items() if k != "sft_nothink_tasks"})
    # and notebook 05 records list-valued parameters (the task families) in the params it writes
    import json
    from pathlib import Path
    nb = json.loads((Path(__file__).parents[1] / "notebooks" / "05_sft.ipynb").read_text())
    setup = next("".join(c["source"]) for c in nb["cells"] if '"params": {k: v' in "".join(c["source"]))
    assert "list" in setup.split('"params"', 1)[1].split("}", 1)[0]
