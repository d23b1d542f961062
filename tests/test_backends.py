"""Backends: the OpenAI-compatible HTTP server + client on real loopback sockets, and transformers' generate."""
import json
import time
import urllib.request

import pytest
import torch

from zaya_lib.data.tokenizer import encode_chat, train_tokenizer
from zaya_lib.model.checkpoint import to_hf_reference
from zaya_lib.ttc.backends import BackendError, EngineBackend, HTTPBackend, TransformersBackend
from zaya_lib.ttc.server import serve

from _helpers import tiny_model


@pytest.fixture(scope="module")
def tok():
    texts = [f"Compute {a}+{b}. <think>{a}+{b}</think>\\boxed{{{a + b}}}" for a in range(40) for b in range(0, 40, 7)]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_model(tok).eval()
    with torch.no_grad():  # sharpen so greedy decoding has clear argmax margins across implementations
        m.model.embed_tokens.weight.mul_(25.0)
    return m


@pytest.fixture(scope="module")
def prompts(tok):
    return [encode_chat(tok, q)[0] for q in ("Compute 12+7.", "Compute 3+30.", "Compute 25+14 and 9.")]


def test_http_server_and_client_on_loopback(model, tok, prompts):
    local = EngineBackend(model, tok)
    want = local.generate(prompts, 10, temperature=0.0, seed=0)
    with serve(local, host="127.0.0.1", port=0, idle_timeout_s=60) as srv:
        assert srv.host == "127.0.0.1" and srv.port > 0
        client = HTTPBackend(srv.url + "/v1", tokenizer=tok, timeout_s=60)
        got = client.generate(prompts, 10, temperature=0.0, seed=0)
        assert [c.token_ids for c in got] == [c.token_ids for c in want]
        assert [c.text for c in got] == [c.text for c in want]
        assert [c.finish_reason for c in got] == [c.finish_reason for c in want]
        # text prompts: the server tokenises verbatim, special-token strings included -> same ids, same output
        texts = [tok.decode(p, skip_special_tokens=False) for p in prompts]
        assert [c.token_ids for c in client.generate(texts, 10, temperature=0.0, seed=0)] == \
            [c.token_ids for c in want]
        # seeded sampling over HTTP equals the engine with the same seed
        s1 = client.generate(prompts, 8, temperature=1.0, seed=4)
        assert [c.token_ids for c in s1] == [c.token_ids for c in local.generate(prompts, 8, 1.0, 4)]
        # models endpoint
        with urllib.request.urlopen(srv.url + "/v1/models", timeout=10) as r:
            assert json.loads(r.read())["data"][0]["id"] == "zaya"
        # bad requests are refused with a message naming the field, and the server keeps serving
        with pytest.raises(BackendError, match="max_tokens"):
            client.generate(prompts, 10**6, temperature=0.0, seed=0)
        with pytest.raises(BackendError, match="top_p"):
            client.generate(prompts, 4, temperature=1.0, seed=0, top_p=1.5)
        assert len(client.generate(prompts[:1], 2, temperature=0.0, seed=0)) == 1
        assert srv.requests_served == 4  # the two refused requests are not served
    assert not srv.running
    with pytest.raises(BackendError, match="failed"):  # closed: connection refused, reported with the URL
        HTTPBackend(srv.url, timeout_s=5).generate(prompts, 2, temperature=0.0, seed=0)


def test_server_stops_itself_when_idle(model, tok):
    srv = serve(EngineBackend(model, tok), idle_timeout_s=0.3)
    deadline = time.monotonic() + 10
    while srv.running and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not srv.running


def test_server_refuses_non_loopback(model, tok):
    with pytest.raises(ValueError, match="loopback"):
        serve(EngineBackend(model, tok), host="0.0.0.0")


def test_transformers_backend_matches_engine(model, tok, prompts):
    """transformers' own ZayaForCausalLM holding our weights, driven by `model.generate`: greedy equals our engine.
    Prompts of equal length: transformers' port is compared without padding (its padding handling is its own)."""
    ref = to_hf_reference(model).eval()
    hf = TransformersBackend(ref, tok)
    same_len = [p for p in prompts if len(p) == len(prompts[0])]
    want = EngineBackend(model, tok).generate(same_len, 8, temperature=0.0, seed=0)
    got = hf.generate(same_len, 8, temperature=0.0, seed=0)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    # seeded sampling is reproducible and leaves the global RNG alone
    state = torch.random.get_rng_state()
    a = hf.generate(prompts, 6, temperature=1.0, seed=1)
    b = hf.generate(prompts, 6, temperature=1.0, seed=1)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert torch.equal(state, torch.random.get_rng_state())


def test_transformers_backend_left_padding_on_our_model(model, tok, prompts):
    """Any causal LM: our model through transformers' generate loop, left-padded batch == one prompt at a time."""
    hf = TransformersBackend(model, tok)
    batch = [c.token_ids for c in hf.generate(prompts, 8, temperature=0.0, seed=0)]
    single = [hf.generate([p], 8, temperature=0.0, seed=0)[0].token_ids for p in prompts]
    assert batch == single
    assert batch == [c.token_ids for c in EngineBackend(model, tok).generate(prompts, 8, 0.0, 0)]
