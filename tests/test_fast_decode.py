"""The engine's folded decode step (zaya_lib.ttc.decode.FastDecoder) against the model's own cached forward: logits
per step (left-padded rows, rows leaving the batch), greedy engine outputs, fallbacks and weight refresh."""
import pytest
import torch

from zaya_lib.config import get_config
from zaya_lib.model import ZayaCache, ZayaForCausalLM
from zaya_lib.ttc import decode
from zaya_lib.ttc.decode import FastDecoder
from zaya_lib.ttc.engine import Engine


def _model(seed=0, **over):
    torch.manual_seed(seed)
    m = ZayaForCausalLM(get_config("debug", **over)).eval()
    with torch.no_grad():  # move the identity-initialised scales/biases/temperatures so every folded constant matters
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
        m.model.embed_tokens.weight.mul_(25.0)  # clear argmax margins (see tests/test_engine.py)
    return m


@pytest.fixture(scope="module")
def model():
    return _model()


def _compare_steps(m, dec, lens, steps=7, drop_after=None):
    """Prefill two caches identically, then feed the plain path's greedy tokens to both paths; return the max
    relative logit difference (optionally dropping rows from both batches after `drop_after` steps)."""
    cfg = m.config
    B, P = len(lens), max(lens)
    S = P + steps + 1
    g = torch.Generator().manual_seed(3)
    ids = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    for r, n in enumerate(lens):
        ids[r, P - n:] = torch.randint(3, cfg.vocab_size, (n,), generator=g)
        mask[r, P - n:] = 1
    mask[:, P:] = 1
    c_ref, c_fast = ZayaCache(cfg.num_hidden_layers, S), ZayaCache(cfg.num_hidden_layers, S)
    worst = 0.0
    with torch.inference_mode():
        first = m(input_ids=ids, attention_mask=mask[:, :P], past_key_values=c_ref, use_cache=True,
                  logits_to_keep=1).logits[:, -1]
        m(input_ids=ids, attention_mask=mask[:, :P], past_key_values=c_fast, use_cache=True, logits_to_keep=1)
        pos = torch.tensor(lens)
        run = dec.start(c_fast, mask, pos)
        tok = first.argmax(-1)
        for step in range(steps):
            if drop_after is not None and step == drop_after:
                keep = torch.tensor([r for r in range(tok.shape[0]) if r % 2 == 0])
                c_ref.reorder(keep)
                c_fast.reorder(keep)
                run.reorder(keep)
                tok, mask, pos = tok[keep], mask[keep], pos[keep]
            ref = m(input_ids=tok[:, None], attention_mask=mask[:, :P + step + 1], position_ids=pos[:, None] + step,
                    past_key_values=c_ref, use_cache=True, logits_to_keep=1).logits[:, -1]
            got = run.step(tok)
            assert got.shape == ref.shape
            assert torch.equal(got.argmax(-1), ref.argmax(-1))
            worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
            tok = ref.argmax(-1)
    # the cache the fast path wrote is the model's own layout: a plain forward can continue from it
    assert c_fast.seq_len == c_ref.seq_len
    for a, b in zip(c_fast.k, c_ref.k):
        torch.testing.assert_close(a[:, :, :c_ref.seq_len], b[:, :, :c_ref.seq_len], rtol=1e-5, atol=1e-5)
    return worst


@pytest.mark.parametrize("lens", [[6, 6, 6], [5, 11, 2, 8]])
@pytest.mark.parametrize("scratch", ["default", "none"])
def test_step_logits_match_cached_forward(model, lens, scratch, monkeypatch):
    if scratch == "none":  # every expert product through the GEMM branch of `_expert_matmul`
        monkeypatch.setattr(decode, "_SCRATCH_BYTES", 0)
    assert _compare_steps(model, FastDecoder(model), lens) < 1e-5


def test_step_matches_with_longer_convs_and_rows_leaving():
    m = _model(seed=1, cca_time0=3, cca_time1=2)  # 3 cached raw columns; exercises the folded conv taps in general
    assert _compare_steps(m, FastDecoder(m), [4, 9, 1, 7], drop_after=3) < 1e-5


def test_compiled_moe_matches_cached_forward(model):
    pytest.importorskip("torch._inductor")
    assert _compare_steps(model, FastDecoder(model, compile=True), [5, 11, 2, 8], drop_after=2) < 1e-5


def _plain_then_fast(model, prompts, eos, finished, **kw):
    outs = []
    for fast in (False, True):
        eng = Engine(model, eos_token_id=eos, pad_token_id=0, finished=finished, fast_decode=fast, **kw)
        outs.append(eng.generate(prompts, 12, temperature=0.0))
    return outs


@pytest.mark.parametrize("finished", ["drop", "mask"])
def test_engine_greedy_fast_equals_plain_with_ragged_stops(model, finished):
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 120, (n,), generator=g).tolist() for n in (5, 11, 2, 8, 3)]
    free = Engine(model, eos_token_id=127, pad_token_id=0, fast_decode=False).generate(prompts, 12, temperature=0.0)
    eos = sorted({free.token_ids[0][3], free.token_ids[1][7]})  # rows stop at different steps (others may too)
    plain, fast = _plain_then_fast(model, prompts, eos, finished)
    assert fast.token_ids == plain.token_ids
    assert fast.finish_reasons == plain.finish_reasons
    assert fast.num_generated == plain.num_generated
    assert "stop" in fast.finish_reasons and "length" in fast.finish_reasons


def test_engine_compiled_greedy_equals_plain(model):
    pytest.importorskip("torch._inductor")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 120, (n,), generator=g).tolist() for n in (4, 9, 1)]
    plain, fast = _plain_then_fast(model, prompts, 127, "drop", compile=True)
    assert fast.token_ids == plain.token_ids


def test_seeded_sampling_reproducible_on_the_fast_path(model):
    eng = Engine(model, eos_token_id=127, pad_token_id=0)
    a = eng.generate([[5, 6, 7], [9]], 10, temperature=1.0, top_p=0.9, seed=4)
    b = eng.generate([[5, 6, 7], [9]], 10, temperature=1.0, top_p=0.9, seed=4)
    assert a.token_ids == b.token_ids


def test_unsupported_models_use_the_plain_forward(model):
    assert FastDecoder.supports(model)
    assert not FastDecoder.supports(ZayaForCausalLM(get_config("debug")).to(torch.bfloat16))
    calls = []
    h = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        assert not FastDecoder.supports(model)
        eng = Engine(model, eos_token_id=127, pad_token_id=0)
        eng.generate([[5, 6, 7]], 4, temperature=0.0)
        assert len(calls) == 4  # prefill + 3 decode steps all went through the module
    finally:
        h.remove()
    head_calls = []
    h = model.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    try:  # a hook on the head is fine: the fast path calls lm_head as a module
        assert FastDecoder.supports(model)
        Engine(model, eos_token_id=127, pad_token_id=0).generate([[5, 6, 7]], 4, temperature=0.0)
        assert len(head_calls) == 4
    finally:
        h.remove()


def test_decoder_refreshes_after_weight_changes():
    m = _model(seed=2)
    eng = Engine(m, eos_token_id=127, pad_token_id=0)
    prompts = [[5, 6, 7, 8], [9, 10]]
    eng.generate(prompts, 6, temperature=0.0)
    first = eng._decoder
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.mul_(-1.5)
            layer.mlp.gate.balancing_biases[:4] += 0.3
    got = eng.generate(prompts, 6, temperature=0.0)
    assert eng._decoder is not first
    want = Engine(m, eos_token_id=127, pad_token_id=0, fast_decode=False).generate(prompts, 6, temperature=0.0)
    assert got.token_ids == want.token_ids


def test_engine_compiles_by_default_and_the_environment_can_turn_it_off(model, monkeypatch):
    from zaya_lib.ttc.engine import Engine

    monkeypatch.delenv("ZAYA_ENGINE_COMPILE", raising=False)
    assert Engine(model, eos_token_id=0, pad_token_id=0).compile is True
    monkeypatch.setenv("ZAYA_ENGINE_COMPILE", "0")
    assert Engine(model, eos_token_id=0, pad_token_id=0).compile is False
    assert Engine(model, eos_token_id=0, pad_token_id=0, compile=True).compile is True
