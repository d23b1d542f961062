"""Generation backends behind one small interface, so RSA and the notebooks run on any of them (issue 7).

    backend.generate(prompts, max_new_tokens, temperature, seed, top_p=1.0) -> list[Completion(text, token_ids)]

`prompts` is a list of token-id lists (authoritative: Markovian RSA builds its prompts as ids so the context bound
holds by construction) or a list of strings (tokenised verbatim, no template added). `token_ids` never include the
stop token; `finish_reason` is "stop" (EOS) or "length"; `num_generated` counts the tokens the model produced
(the stop token included), which is what RSA's token budget charges.

Notable features:
- `EngineBackend`: our batched engine (`zaya_lib.ttc.engine`) on our model.
- `TransformersBackend`: any transformers causal LM through `model.generate` (left padding, seeded sampling);
  `generate_ids` is the same path as a plain function on our chat format (stops at `<|end|>`, drops padding), which
  RL uses for its held-out evaluation and its aggregation tails.
- `HTTPBackend`: an OpenAI-compatible `/v1/completions` client (vLLM / SGLang at scale; `zaya_lib.ttc.server`
  here) using only the standard library; sends token-id prompts as lists of ints, asks for completion token ids
  (`return_token_ids`, vLLM's field) and falls back to tokenising the returned text; bounded timeouts and a
  clear `BackendError` naming the URL and the server's message.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from zaya_lib.ttc.engine import Engine

__all__ = ["Completion", "Backend", "BackendError", "EngineBackend", "TransformersBackend", "HTTPBackend", "left_pad",
           "generate_ids"]

Prompts = Sequence[Sequence[int]] | Sequence[str]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str = "length"
    num_generated: int = 0

    def __post_init__(self):
        if not self.num_generated:
            self.num_generated = len(self.token_ids) + (self.finish_reason == "stop")


class BackendError(RuntimeError):
    """A backend could not produce completions (server down, bad response, model error)."""


class Backend:
    """The interface; subclasses implement `generate`."""

    tokenizer: Any = None

    def generate(self, prompts: Prompts, max_new_tokens: int, temperature: float, seed: int,
                 top_p: float = 1.0) -> list[Completion]:
        raise NotImplementedError


class EngineBackend(Backend):
    """Our engine on our model. `batch_size` rows are decoded together."""

    def __init__(self, model, tokenizer, batch_size: int = 64, finished: str = "drop"):
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer, batch_size=batch_size, finished=finished)

    def generate(self, prompts, max_new_tokens, temperature, seed, top_p=1.0):
        out = self.engine.generate(prompts, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        return [Completion(t, ids, r, n) for t, ids, r, n in
                zip(out.texts, out.token_ids, out.finish_reasons, out.num_generated)]


class TransformersBackend(Backend):
    """Any transformers causal LM via `model.generate`. Sampling is seeded through `torch.manual_seed(seed)` (generate
    has no generator argument); the global RNG state is restored afterwards."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature, seed, top_p=1.0):
        ids = [list(self.tokenizer.encode(p, add_special_tokens=False)) if isinstance(p, str) else [int(t) for t in p]
               for p in prompts]
        if any(not p for p in ids):
            raise ValueError("TransformersBackend: a prompt is empty")
        dev = next(self.model.parameters()).device
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(int(seed))
        out: list[Completion] = []
        try:
            for s in range(0, len(ids), self.batch_size):
                x, am = left_pad(ids[s:s + self.batch_size], self.pad_id)
                P = x.shape[1]
                kw = dict(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0) \
                    if temperature > 0 else dict(do_sample=False)
                seq = self.model.generate(input_ids=x.to(dev), attention_mask=am.to(dev), max_new_tokens=max_new_tokens,
                                          eos_token_id=self.eos_id, pad_token_id=self.pad_id, **kw)
                for row in seq[:, P:].tolist():
                    stop = self.eos_id in row
                    toks = row[:row.index(self.eos_id)] if stop else row
                    out.append(Completion(self.tokenizer.decode(toks, skip_special_tokens=False), toks,
                                          "stop" if stop else "length"))
        finally:
            torch.random.set_rng_state(rng_state)
        return out


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id prompts as one left-padded batch: (ids [B, P], attention mask [B, P]), P the longest prompt."""
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, P - len(p):] = torch.tensor(p)
        mask[r, P - len(p):] = 1
    return ids, mask


@torch.no_grad()
def generate_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                 batch_size: int = 64, seed: int = 0) -> list[list[int]]:
    """Completion ids (up to and excluding `<|end|>`) for token-id prompts, left-padded batches through
    `model.generate` (our ZayaCache). temperature 0 = greedy; sampling seeds the global RNG once per batch from a
    generator seeded with `seed` (`model.generate` samples from it)."""
    was_training = model.training
    model.eval()
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    pad = tokenizer.pad_token_id
    dev = next(model.parameters()).device
    out: list[list[int]] = []
    gen = torch.Generator().manual_seed(seed)
    for s in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[s:s + batch_size], pad)
        T = ids.shape[1]
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))  # generate samples from the global RNG
        kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False)
        o = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_new_tokens,
                           eos_token_id=end, pad_token_id=pad, **kw)
        for row in o[:, T:].tolist():
            cut = row.index(end) if end in row else len(row)
            out.append([t for t in row[:cut] if t != pad])
    if was_training:
        model.train()
    return out


class HTTPBackend(Backend):
    """Client for an OpenAI-compatible `/v1/completions` endpoint.

    base_url: e.g. "http://127.0.0.1:8000" (with or without a trailing /v1). `model`: the served model name.
    `tokenizer` (optional) turns returned text into ids when the server does not return token ids.
    Prompts go out `max_prompts_per_request` at a time (OpenAI batch form: a list of prompts).
    """

    def __init__(self, base_url: str, model: str = "zaya", tokenizer: Any = None, timeout_s: float = 600.0,
                 max_prompts_per_request: int = 256):
        url = base_url.rstrip("/")
        self.base_url = url[:-3] if url.endswith("/v1") else url
        self.model, self.tokenizer, self.timeout_s = model, tokenizer, timeout_s
        self.max_prompts_per_request = max_prompts_per_request

    def _post(self, path: str, body: dict) -> dict:
        url = f"{self.base_url}{path}"
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise BackendError(f"POST {url} failed with HTTP {e.code}: {detail}") from e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise BackendError(f"POST {url} failed: {e}") from e
        except json.JSONDecodeError as e:
            raise BackendError(f"POST {url} returned invalid JSON: {e}") from e

    def generate(self, prompts, max_new_tokens, temperature, seed, top_p=1.0):
        prompts = [p if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        out: list[Completion] = []
        for s in range(0, len(prompts), self.max_prompts_per_request):
            chunk = prompts[s:s + self.max_prompts_per_request]
            body = {"model": self.model, "prompt": chunk, "max_tokens": int(max_new_tokens),
                    "temperature": float(temperature), "top_p": float(top_p), "seed": int(seed) + s, "n": 1,
                    "return_token_ids": True, "skip_special_tokens": False}
            resp = self._post("/v1/completions", body)
            choices = resp.get("choices")
            if not isinstance(choices, list) or len(choices) != len(chunk):
                raise BackendError(f"{self.base_url}/v1/completions returned {len(choices or [])} choices for "
                                   f"{len(chunk)} prompts")
            for c in sorted(choices, key=lambda c: c.get("index", 0)):
                text = c.get("text", "")
                ids = c.get("token_ids")
                if ids is None:
                    if self.tokenizer is None:
                        raise BackendError("the server returned no token_ids; give HTTPBackend a tokenizer")
                    ids = list(self.tokenizer.encode(text, add_special_tokens=False))
                reason = "stop" if c.get("finish_reason") == "stop" else "length"
                out.append(Completion(text, [int(t) for t in ids], reason))
        return out
