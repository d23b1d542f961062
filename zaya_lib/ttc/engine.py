"""A batched sampling engine for `ZayaForCausalLM` (issue 7): the generator behind RSA, the notebooks and the server.

Shape legend: B rows in flight, P padded prompt length, S = P + max_new_tokens cache capacity, V vocabulary.

Notable features:
- Left-padded prefill of the whole batch in one forward; the compressed CCA K/V cache (`ZayaCache`) is allocated
  ONCE at S = P + max_new_tokens and decoding writes into it in place (no growth, no copies per token).
- Logits only for the last position (`logits_to_keep=1`): a prefill never materialises [B, P, V].
- Each row stops at its own EOS (any id of `eos_token_id`). Finished rows leave the batch through `ZayaCache.reorder`
  (`finished="drop"`, default) or keep running with their outputs ignored (`finished="mask"`); `benchmarks/
  bench_engine.py` measures both (dropping wins once rows finish at different times, see the JSON it writes).
- Greedy (temperature 0), temperature and nucleus (top-p) sampling, seeded with a private `torch.Generator`, so a
  run is reproducible and never touches the global RNG.
- The per-token Python work is O(1) in the vocabulary: all sampling is tensor ops on [B, V]; the only host sync per
  step is one "did any row finish" check.
- Prompts are processed in chunks of `batch_size` rows sorted by length (less padding), and returned in input order.
- A quiet progress bar (`zaya_lib.utils.progress`) counts generated tokens.
- Decode steps go through `zaya_lib.ttc.decode.FastDecoder` (constants folded into small weights once, RoPE table
  and pad mask built once per chunk, ~50 tensor ops per layer instead of several hundred; same cache layout) when
  the model is a plain fp32 `ZayaForCausalLM` without hooks outside `lm_head`; `fast_decode=False` or any other
  model uses the model's own forward. By default (`compile=True`) the decode MoE also runs through torch.compile:
  a one-off compile of ~5-10 s per process (dynamic batch size: not per call), then ~25-35% faster decoding on the
  bench and tiny models; if compilation fails (no C++ toolchain, an inductor error) the step warns and stays
  eager. `compile=False` (or ZAYA_ENGINE_COMPILE=0 in the environment) keeps it eager.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from zaya_lib.model.cache import ZayaCache
from zaya_lib.ttc.decode import FastDecoder
from zaya_lib.utils import progress

__all__ = ["GenerationOutput", "Engine", "sample_next"]


@dataclass
class GenerationOutput:
    """Per prompt, in input order: generated ids (EOS excluded), decoded texts (None without a tokenizer), why each
    stopped ("stop" = EOS, "length" = hit max_new_tokens), and the count of tokens the model produced (EOS included)."""

    token_ids: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]
    num_generated: list[int]


def _draw(probs_BV: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row [B, 1] with probability proportional to `probs_BV` (rows need not sum to 1), by inverting
    the cumulative distribution at one uniform draw per row. `torch.multinomial` draws an exponential variate per
    vocabulary entry instead (B * V random numbers a step); this needs B. Zero-probability entries are never drawn:
    the first index whose running sum exceeds u is taken, and a zero entry does not raise the sum."""
    cdf_BV = probs_BV.cumsum(dim=-1)
    u_B1 = torch.rand(probs_BV.shape[0], 1, generator=generator, device=probs_BV.device) * cdf_BV[:, -1:]
    return torch.searchsorted(cdf_BV, u_B1, right=True).clamp_(max=probs_BV.shape[-1] - 1)


def sample_next(logits_BV: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row [B] from last-position logits [B, V]. temperature 0 = greedy; top_p < 1 keeps the smallest
    set of most likely tokens whose probability reaches top_p (always at least the most likely one)."""
    if temperature == 0.0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV.float() / temperature
    if top_p < 1.0:
        sorted_logits, order_BV = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above this one
        pick = _draw(probs.masked_fill(mass_before >= top_p, 0.0), generator)  # [B, 1] rank
        return order_BV.gather(-1, pick).squeeze(-1)
    return _draw(logits.softmax(dim=-1), generator).squeeze(-1)


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


class Engine:
    """Batched generation with our model.

    engine = Engine(model, tokenizer)            # eos/pad ids from the tokenizer (eos = `<|end|>`)
    out = engine.generate([[1, 4, ...], ...], max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0)

    fast_decode: decode with the folded single-token step (default; falls back to the model's forward where it
    does not apply). compile: also torch.compile the decode MoE (default on; None reads ZAYA_ENGINE_COMPILE, "0" = off).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, batch_size: int = 64, finished: str = "drop",
                 fast_decode: bool = True, compile: bool | None = None):
        if finished not in ("drop", "mask"):
            raise ValueError(f"finished must be 'drop' or 'mask', got {finished!r}")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.tokenizer = tokenizer
        if eos_token_id is None:
            eos_token_id = tokenizer.eos_token_id if tokenizer is not None else model.config.eos_token_id
        if pad_token_id is None:
            pad_token_id = tokenizer.pad_token_id if tokenizer is not None else model.config.pad_token_id
        if eos_token_id is None or pad_token_id is None:
            raise ValueError("Engine needs eos_token_id and pad_token_id (pass them, or a tokenizer that has both)")
        self.eos_ids = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
        self.pad_id = int(pad_token_id)
        self.batch_size = batch_size
        self.finished = finished
        self.vocab_size = int(model.config.vocab_size)
        self.fast_decode = fast_decode  # decode steps through `FastDecoder` when the model supports it
        if compile is None:
            compile = os.environ.get("ZAYA_ENGINE_COMPILE", "1") != "0"
        self.compile = bool(compile)  # the fast decode step's MoE through torch.compile (see `zaya_lib.ttc.decode`)
        self._decoder: FastDecoder | None = None

    def _fast_decoder(self) -> FastDecoder | None:
        """The folded decode weights, rebuilt when the model's weights changed since (None: use the plain forward)."""
        if not self.fast_decode or not FastDecoder.supports(self.model):
            return None
        if self._decoder is None or self._decoder.model is not self.model or self._decoder.stale():
            self._decoder = FastDecoder(self.model, compile=self.compile)
        return self._decoder

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: Sequence[Sequence[int]] | Sequence[str]) -> list[list[int]]:
        """Token-id prompts pass through; text prompts are tokenised verbatim (special-token strings such as
        `<bos><|user|>` become their ids; no template is added)."""
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer; pass token ids or give the Engine a tokenizer")
                ids = list(self.tokenizer.encode(p, add_special_tokens=False))
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is empty")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.vocab_size}): {bad[:5]}")
            out.append(ids)
        return out

    @torch.inference_mode()  # no autograd bookkeeping at all (cheaper than no_grad per op); the cache stays internal
    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[str], max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 0, desc: str = "generate") -> GenerationOutput:
        """Generate for every prompt; see the class docstring. Deterministic given (prompts, settings, seed,
        batch_size); greedy results do not depend on the batching at all (up to float ties)."""
        _check_sampling(max_new_tokens, temperature, top_p)
        ids = self.encode(prompts)
        if not ids:
            return GenerationOutput([], [] if self.tokenizer is not None else None, [], [])
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed))
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a chunk: less padding
        results: list[tuple[list[int], str]] = [([], "")] * len(ids)
        was_training = self.model.training
        self.model.eval()
        bar = progress(total=len(ids) * max_new_tokens, desc=desc, unit="tok", leave=False)
        try:
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                for i, r in zip(chunk, self._generate_chunk([ids[i] for i in chunk], max_new_tokens, temperature,
                                                            top_p, gen, bar)):
                    results[i] = r
        finally:
            bar.close()
            self.model.train(was_training)
        token_ids = [r[0] for r in results]
        reasons = [r[1] for r in results]
        texts = None
        if self.tokenizer is not None:
            texts = [self.tokenizer.decode(t, skip_special_tokens=False) for t in token_ids]
        num = [len(t) + (reason == "stop") for t, reason in zip(token_ids, reasons)]
        return GenerationOutput(token_ids, texts, reasons, num)

    def _generate_chunk(self, prompts: list[list[int]], max_new: int, temperature: float, top_p: float,
                        gen: torch.Generator, bar) -> list[tuple[list[int], str]]:
        dev = self.device
        B = len(prompts)
        P = max(map(len, prompts))
        S = P + max_new
        # Left-padded prompts and the attention mask for the whole run, [B, S]: decoding fills columns P, P+1, ...
        input_BP = torch.full((B, P), self.pad_id, dtype=torch.long)
        mask_BS = torch.zeros(B, S, dtype=torch.long)
        for r, p in enumerate(prompts):
            input_BP[r, P - len(p):] = torch.tensor(p, dtype=torch.long)
            mask_BS[r, P - len(p):] = 1
        input_BP, mask_BS = input_BP.to(dev), mask_BS.to(dev)
        mask_BS[:, P:] = 1  # generated tokens are always real (finished rows are dropped or ignored)
        # Positions restart at each row's first real token; decode positions continue from the prompt length.
        pos_B = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=dev)
        eos = torch.tensor(self.eos_ids, dtype=torch.long, device=dev)

        cache = ZayaCache(self.model.config.num_hidden_layers, max_length=S)  # allocated once, at full capacity
        out_BN = torch.full((B, max_new), self.pad_id, dtype=torch.long, device=dev)
        n_gen = torch.full((B,), max_new, dtype=torch.long, device=dev)  # tokens written before EOS (EOS excluded)
        stopped = torch.zeros(B, dtype=torch.bool, device=dev)
        rows = torch.arange(B, device=dev)  # original row of each row in flight
        drop = self.finished == "drop"

        logits = self.model(input_ids=input_BP, attention_mask=mask_BS[:, :P], past_key_values=cache,
                            use_cache=True, logits_to_keep=1).logits[:, -1]
        dec = self._fast_decoder()
        run = dec.start(cache, mask_BS, pos_B) if dec is not None else None
        for step in range(max_new):
            tok_B = sample_next(logits, temperature, top_p, gen)
            out_BN[rows, step] = tok_B
            hit_B = torch.isin(tok_B, eos)
            if not drop:
                hit_B &= ~stopped
            bar.update(int(rows.numel()))
            if bool(hit_B.any()):  # the one host sync per step
                n_gen[rows[hit_B]] = step
                stopped[rows[hit_B]] = True
                if drop:
                    keep = (~hit_B).nonzero().squeeze(-1)
                    if keep.numel() == 0:
                        break
                    cache.reorder(keep)
                    if run is not None:
                        run.reorder(keep)
                    rows, tok_B, mask_BS, pos_B = rows[keep], tok_B[keep], mask_BS[keep], pos_B[keep]
                elif bool(stopped.all()):
                    break
            if step == max_new - 1:
                break
            if run is not None:
                logits = run.step(tok_B)
                continue
            cur = P + step + 1
            logits = self.model(input_ids=tok_B[:, None], attention_mask=mask_BS[:, :cur],
                                position_ids=pos_B[:, None] + step, past_key_values=cache, use_cache=True,
                                logits_to_keep=1).logits[:, -1]

        out = out_BN.cpu().tolist()
        n = n_gen.cpu().tolist()
        st = stopped.cpu().tolist()
        return [(o[:k], "stop" if s else "length") for o, k, s in zip(out, n, st)]
