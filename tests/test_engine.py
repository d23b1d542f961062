"""The generation engine (zaya_lib.ttc.engine): exactness against uncached decoding, seeding, EOS per row, top-p."""
import pytest
import torch

from zaya_lib.config import get_config
from zaya_lib.model import ZayaForCausalLM
from zaya_lib.ttc.engine import Engine, sample_next

NEVER = 127  # an id the test prompts never contain; used as EOS when rows must run to the length limit


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ZayaForCausalLM(get_config("debug")).eval()
    # Sharpen the random model so greedy argmax has clear margins (no float ties between cached/uncached paths).
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(25.0)
    return m


@pytest.fixture(scope="module")
def soft_model():
    """Plain initialisation: near-uniform next-token distributions, so sampling really varies with the seed."""
    torch.manual_seed(1)
    return ZayaForCausalLM(get_config("debug")).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 120, (n,), generator=g).tolist() for n in (5, 11, 2, 8)]


def uncached_greedy(model, prompt, max_new, eos):
    """Reference: full forward over the whole sequence at every step, argmax of the last position."""
    seq, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new):
            t = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if t in eos:
                return out, "stop"
            out.append(t)
            seq.append(t)
    return out, "length"


@pytest.fixture(scope="module")
def reference(model, prompts):
    return [uncached_greedy(model, p, 12, {NEVER}) for p in prompts]


@pytest.mark.parametrize("finished", ["drop", "mask"])
def test_greedy_equals_uncached_argmax(model, prompts, reference, finished):
    eng = Engine(model, eos_token_id=NEVER, pad_token_id=0, finished=finished)
    out = eng.generate(prompts, 12, temperature=0.0)
    for (ref, ref_why), ids, why in zip(reference, out.token_ids, out.finish_reasons):
        assert ids == ref  # token for token
        assert why == ref_why == "length"
    assert out.num_generated == [12] * len(prompts)


@pytest.mark.parametrize("finished", ["drop", "mask"])
def test_eos_stops_each_row_independently(model, prompts, reference, finished):
    # Pick as EOS a token that row 0 emits early in its free-running greedy output; each row must then stop exactly
    # at its own first occurrence of it (or run to the limit), and rows that keep going must be unaffected.
    free = [r for r, _ in reference]  # free-running greedy (checked against the engine above)
    eos = free[0][3]
    out = Engine(model, eos_token_id=eos, pad_token_id=0, finished=finished).generate(prompts, 12, temperature=0.0)
    reasons = []
    for f, ids, why, n in zip(free, out.token_ids, out.finish_reasons, out.num_generated):
        if eos in f:
            k = f.index(eos)
            assert ids == f[:k] and why == "stop" and n == k + 1
        else:
            assert ids == f and why == "length" and n == 12
        reasons.append(why)
    assert reasons[0] == "stop" and len(out.token_ids[0]) <= 3
    assert "length" in reasons or len(set(map(len, out.token_ids))) > 1  # rows really finished at different times


def test_batch_equals_single_prompt_greedy(model, prompts, reference):
    eng = Engine(model, eos_token_id=NEVER, pad_token_id=0, batch_size=3)  # also exercises chunking + reordering
    batch = eng.generate(prompts, 12, temperature=0.0).token_ids
    single = [eng.generate([p], 12, temperature=0.0).token_ids[0] for p in prompts]
    assert batch == single == [r for r, _ in reference]


def test_seeded_sampling_is_reproducible(soft_model, prompts):
    eng = Engine(soft_model, eos_token_id=NEVER, pad_token_id=0)
    state = torch.random.get_rng_state()
    a = eng.generate(prompts, 8, temperature=1.0, top_p=0.9, seed=5).token_ids
    b = eng.generate(prompts, 8, temperature=1.0, top_p=0.9, seed=5).token_ids
    c = eng.generate(prompts, 8, temperature=1.0, top_p=0.9, seed=6).token_ids
    assert a == b
    assert a != c  # 4 x 8 draws from a vocabulary of 128: identical by chance is out of the question
    assert torch.equal(state, torch.random.get_rng_state())  # the engine uses its own generator


def test_tiny_top_p_is_greedy(model, prompts, reference):
    eng = Engine(model, eos_token_id=NEVER, pad_token_id=0)
    greedy = [r for r, _ in reference]
    assert eng.generate(prompts, 12, temperature=1.0, top_p=1e-6, seed=3).token_ids == greedy


def test_top_p_keeps_the_nucleus_with_renormalised_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4).contiguous()
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits, 1.0, 0.7, g)
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    # nucleus for top_p = 0.7: {0.5, 0.3} (mass 0.8 >= 0.7); token 2 and 3 must never appear
    assert counts[2] == 0 and counts[3] == 0
    # renormalised 0.625 / 0.375; binomial std at n=20000 is 0.0034, so 0.02 is > 5 sigma
    assert abs(counts[0] - 0.625) < 0.02
    # temperature: T -> large flattens; at T=0.5 the top token's share rises above its p=0.5 (to 0.25/0.365 ≈ 0.685)
    sharp = torch.bincount(sample_next(logits, 0.5, 1.0, g), minlength=4).float() / len(draws)
    assert abs(sharp[0] - 0.25 / 0.365) < 0.02


def test_full_distribution_sampling_matches_probabilities_and_skips_zero_entries():
    # inverse-CDF draws (one uniform per row): frequencies follow p, and a zero-probability token (here id 1, between
    # non-zero ones, and the last id) is never drawn
    probs = torch.tensor([0.4, 0.0, 0.35, 0.25, 0.0])
    logits = probs.log().expand(20000, 5).contiguous()  # log 0 = -inf
    draws = sample_next(logits, 1.0, 1.0, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=5).float() / len(draws)
    assert freq[1] == 0 and freq[4] == 0
    # binomial std at n=20000 is <= 0.0035; 0.02 is > 5 sigma
    assert torch.allclose(freq[[0, 2, 3]], probs[[0, 2, 3]], atol=0.02)


def test_text_prompts_and_validation(model):
    eng = Engine(model, eos_token_id=NEVER, pad_token_id=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.generate([[5, 6]], 0)
    with pytest.raises(ValueError, match="top_p"):
        eng.generate([[5, 6]], 4, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        eng.generate([[5, 6]], 4, temperature=-1.0)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        eng.generate([[5], []], 4)
    with pytest.raises(ValueError, match="outside"):
        eng.generate([[5, 999]], 4)
    with pytest.raises(ValueError, match="tokenizer"):
        eng.generate(["hello"], 4)
