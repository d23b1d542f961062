"""generate() really decodes from our cache: the forward sees the prompt once, then one token per step.

transformers 5.24 renamed the decode cache from `past_key_values` to `cache` (generate()'s model kwargs, the argument
of prepare_inputs_for_generation, model outputs). A model that only knows the old name still generates the right
tokens on 5.24+, but generate() never gets its cache back and re-runs the whole prefix every step (quadratic, and no
output changes, so only counting what the forward sees catches it). These tests count it on whichever transformers is
installed; TRL's GRPO rollout path is checked in test_trl_compat.py.
"""
from __future__ import annotations

import pytest
import torch

from zaya_lib.config import get_config
from zaya_lib.model import ZayaCache, ZayaForCausalLM
from zaya_lib.ttc.backends import left_pad


class ForwardLengths:
    """Records input_ids.shape[1] of every forward of `model` while active (a forward pre-hook)."""

    def __init__(self, model):
        self.lengths: list[int] = []
        self._h = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.lengths.append(int(ids.shape[1]))

    def close(self):
        self._h.remove()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ZayaForCausalLM(get_config("debug", vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()


def _left_padded(prompts, pad=0):
    return left_pad(prompts, pad)


PROMPTS = [[5, 9, 11, 13, 17, 19, 23], [7, 8, 9]]  # the second is left-padded to 7


@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_prefills_once_then_one_token_per_step(model, do_sample):
    ids, mask = _left_padded(PROMPTS)
    rec = ForwardLengths(model)
    try:
        torch.manual_seed(0)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                             do_sample=do_sample, top_k=0, pad_token_id=0, eos_token_id=2)
    finally:
        rec.close()
    assert out.shape == (2, 7 + 5)
    assert rec.lengths == [7, 1, 1, 1, 1], f"forward input lengths per step: {rec.lengths} (the cache is not used)"


def test_cached_and_uncached_generate_agree(model):
    """The counter measures what it should: without the cache every step re-reads the prefix, and the tokens match."""
    ids, mask = _left_padded(PROMPTS)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False,
              pad_token_id=0, eos_token_id=2)
    rec = ForwardLengths(model)
    try:
        uncached = model.generate(use_cache=False, **kw)
    finally:
        rec.close()
    assert rec.lengths == [7, 8, 9, 10]
    torch.testing.assert_close(model.generate(**kw), uncached, rtol=0, atol=0)


def test_transformers_backend_uses_the_cache(model):
    from zaya_lib.ttc.backends import TransformersBackend

    class Tok:  # ids in, ids out: the backend only needs these
        eos_token_id, pad_token_id = 2, 0

        def decode(self, ids, skip_special_tokens=False):
            return " ".join(map(str, ids))

    backend = TransformersBackend(model, Tok())
    rec = ForwardLengths(model)
    try:
        backend.generate(PROMPTS, max_new_tokens=4, temperature=0.0, seed=0)
    finally:
        rec.close()
    assert rec.lengths[0] == 7 and rec.lengths[1:] == [1] * (len(rec.lengths) - 1) and len(rec.lengths) >= 2, rec.lengths


def test_cache_under_both_names(model):
    """The forward takes the cache as `cache` (transformers >= 5.24) or `past_key_values` (before) and returns it under
    both names; prepare_inputs_for_generation hands it on under the name the installed transformers uses."""
    from zaya_lib.model.modeling import CACHE_NAME

    ids = torch.randint(3, 64, (2, 6))
    with torch.no_grad():
        c1, c2 = ZayaCache(model.config.num_hidden_layers), ZayaCache(model.config.num_hidden_layers)
        a = model(ids, cache=c1, use_cache=True)
        b = model(ids, past_key_values=c2, use_cache=True)
        assert a.cache is c1 and a["cache"] is c1 and b.cache is c2
        assert model(ids[:, :2], use_cache=False).cache is None
        assert "past_key_values" in a and a.past_key_values is c1 and a["past_key_values"] is c1
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
        with pytest.raises(ValueError, match="not two different"):
            model(ids, cache=c1, past_key_values=c2, use_cache=True)
        full = torch.cat([ids, ids[:, -1:]], dim=1)  # generate() passes every token so far
        inputs = model.prepare_inputs_for_generation(full, **{CACHE_NAME: c1})
        assert inputs[CACHE_NAME] is c1 and inputs["input_ids"].shape[1] == 1
        step = model(**inputs).logits
        torch.testing.assert_close(step, model(ids[:, -1:], past_key_values=c2, use_cache=True).logits, rtol=0, atol=0)
