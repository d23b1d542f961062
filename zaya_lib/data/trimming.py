"""Answer-preserving trimming (AP-trimming, ZAYA1 tech report §III-A; spec architecture.md §6).

A sample is a list of turns (`{"role": "system"|"user"|"assistant", "content": str, "thinking": str | None}`);
an assistant turn renders as `<|assistant|><think>{thinking}</think>{content}<|end|>` (no think block when
`thinking` is None). For a context budget C (tokens):

1. keep the sample if it fits;
2. otherwise cut the TAIL of the last assistant turn's thinking (the tokens right before `</think>`), keeping the
   `<think>`/`</think>` markers and the answer whole, so that everything fits;
3. if even an empty last thinking block does not fit, drop earlier assistant turns' think blocks (markers included,
   their answers kept), oldest first, until it does, then repeat step 2;
4. if the answers and other non-thinking content alone exceed C, drop the sample.

Notable features:
- Works on token ids: each sample is tokenised once into pieces (`encode_turns`), and trimming to any budget is then
  integer arithmetic, so "fits" is exact and re-trimming per stage (4K -> 32K -> 131K in the paper) is cheap. Each
  budget trims the ORIGINAL sample, never the output of a smaller budget.
- Pieces are concatenated around special tokens, which a byte-level BPE never merges across, so the ids equal those of
  encoding the whole rendered chat string.
- Returns the loss mask with the ids (1 on assistant tokens after `<|assistant|>`, including `<|end|>`) and
  per-dataset statistics (kept / trimmed / dropped, tokens removed).
- Step 3's order (oldest block first) is our choice: the spec does not say which earlier blocks go first; the oldest
  reasoning is the least relevant to the final answer.

Works with a Hugging Face `PreTrainedTokenizerFast` or a raw `tokenizers.Tokenizer` carrying our special tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from zaya_lib.data.tokenizer import ChatIds, chat_ids, encode_text

__all__ = [
    "split_thinking", "chat_turns",
    "EncodedTurn", "EncodedSample", "encode_turns", "TrimResult", "TrimStats",
    "irreducible_len", "trim", "trim_samples", "trim_per_budget",
]

ROLES = ("system", "user", "assistant")


# ---------------------------------------------------------------------------------------------------------------
# samples as turns

def split_thinking(response: str) -> tuple[str | None, str]:
    """Split `<think>X</think>Y` into (X, Y); a response without a think block gives (None, response).

    Only a think block that opens the response is recognised (our format); everything after the LAST `</think>` is the
    answer, matching the verifier's convention.
    """
    if not response.startswith("<think>"):
        return None, response
    end = response.rfind("</think>")
    if end < 0:  # unfinished thinking: no answer yet
        return response[len("<think>"):], ""
    return response[len("<think>"):end], response[end + len("</think>"):]


def chat_turns(question: str, response: str, system: str | None = None) -> list[dict]:
    """One-exchange sample as turns, splitting the response's think block."""
    thinking, answer = split_thinking(response)
    turns = [{"role": "system", "content": system}] if system else []
    return turns + [{"role": "user", "content": question}, {"role": "assistant", "content": answer, "thinking": thinking}]


@dataclass
class EncodedTurn:
    """One turn as id pieces; rendered as `prefix + [<think>] + thinking + [</think>] + content + suffix`.

    `thinking` is None when the turn has no think block. `loss` marks every token after `prefix` as a target.
    """
    prefix: list[int]
    content: list[int]
    suffix: list[int]
    thinking: list[int] | None = None
    loss: bool = False


@dataclass
class EncodedSample:
    turns: list[EncodedTurn]
    think: int          # id of <think>
    end_think: int      # id of </think>

    def __len__(self) -> int:
        return sum(len(t.prefix) + len(t.content) + len(t.suffix)
                   + (len(t.thinking) + 2 if t.thinking is not None else 0) for t in self.turns)

    def render(self, keep_thinking: Sequence[int | None] | None = None) -> tuple[list[int], list[int]]:
        """(ids, loss_mask). `keep_thinking[i]`: how many leading thinking tokens of turn i to keep (None = drop block)."""
        ids: list[int] = []
        mask: list[int] = []
        for i, t in enumerate(self.turns):
            ids += t.prefix
            mask += [0] * len(t.prefix)
            body: list[int] = []
            if t.thinking is not None:
                keep = len(t.thinking) if keep_thinking is None else keep_thinking[i]
                if keep is not None:
                    body = [self.think] + t.thinking[:keep] + [self.end_think]
            body = body + t.content + t.suffix
            ids += body
            mask += [int(t.loss)] * len(body)
        return ids, mask


def encode_turns(tokenizer: Any, turns: Sequence[dict], ids: ChatIds | None = None) -> EncodedSample:
    """Tokenise a sample: `<bos>` then `<|role|>{[<think>thinking</think>]content}<|end|>` per turn.

    Loss goes on assistant turns (everything after `<|assistant|>`, `<|end|>` included), the SFT convention.
    """
    ids = ids or chat_ids(tokenizer)
    if not turns:
        raise ValueError("a sample needs at least one turn")
    out: list[EncodedTurn] = []
    for i, turn in enumerate(turns):
        role = turn.get("role")
        if role not in ROLES:
            raise ValueError(f"turn {i}: role {role!r} is not one of {ROLES}")
        thinking = turn.get("thinking")
        if thinking is not None and role != "assistant":
            raise ValueError(f"turn {i}: only assistant turns may carry thinking (role {role!r})")
        prefix = ([ids.bos] if i == 0 else []) + [ids.role(role)]
        out.append(EncodedTurn(prefix=prefix, content=encode_text(tokenizer, turn.get("content") or ""),
                               suffix=[ids.end],
                               thinking=None if thinking is None else encode_text(tokenizer, thinking),
                               loss=role == "assistant"))
    return EncodedSample(out, think=ids.think, end_think=ids.end_think)


# ---------------------------------------------------------------------------------------------------------------
# trimming

@dataclass
class TrimResult:
    status: str                     # "kept" | "trimmed" | "dropped"
    ids: list[int] | None           # None when dropped
    loss_mask: list[int] | None
    tokens_in: int                  # untrimmed length
    tokens_removed: int             # thinking tokens (and markers of dropped blocks) removed; 0 when dropped
    blocks_dropped: int = 0         # earlier think blocks removed in step 3


@dataclass
class TrimStats:
    budget: int
    kept: int = 0
    trimmed: int = 0
    dropped: int = 0
    tokens_in: int = 0              # over all samples, before trimming
    tokens_out: int = 0             # over kept + trimmed samples, after trimming
    tokens_removed: int = 0         # by trimming (kept/trimmed samples)
    tokens_dropped: int = 0         # in dropped samples
    blocks_dropped: int = 0

    def add(self, r: TrimResult) -> None:
        setattr(self, r.status, getattr(self, r.status) + 1)
        self.tokens_in += r.tokens_in
        self.tokens_removed += r.tokens_removed
        self.blocks_dropped += r.blocks_dropped
        if r.ids is None:
            self.tokens_dropped += r.tokens_in
        else:
            self.tokens_out += len(r.ids)

    def as_dict(self) -> dict:
        n = self.kept + self.trimmed + self.dropped
        return {**self.__dict__, "samples": n, "frac_trimmed": self.trimmed / max(n, 1),
                "frac_dropped": self.dropped / max(n, 1)}


def _last_think_turn(sample: EncodedSample) -> int | None:
    """Index of the block step 2 trims: the last assistant turn's think block, if that turn has one."""
    assistant = [i for i, t in enumerate(sample.turns) if t.loss]
    if assistant and sample.turns[assistant[-1]].thinking is not None:
        return assistant[-1]
    return None


def irreducible_len(sample: EncodedSample) -> int:
    """Length of what trimming never removes: answers, user/system content, role markers, `<bos>`, `<|end|>`, and
    the last assistant turn's `<think></think>` markers (kept even when its body is emptied). Step 4 drops the
    sample iff this exceeds the budget."""
    thinking = sum(len(t.thinking) + 2 for t in sample.turns if t.thinking is not None)
    return len(sample) - thinking + (2 if _last_think_turn(sample) is not None else 0)


def trim(sample: EncodedSample, budget: int) -> TrimResult:
    """Apply AP-trimming to one encoded sample for a context budget of `budget` tokens (steps 1-4 above)."""
    if budget <= 0:
        raise ValueError(f"context budget must be positive, got {budget}")
    total = len(sample)
    if total <= budget:                                                       # step 1
        ids, mask = sample.render()
        return TrimResult("kept", ids, mask, total, 0)

    think_turns = [i for i, t in enumerate(sample.turns) if t.thinking is not None]
    last = _last_think_turn(sample)
    earlier = [i for i in think_turns if i != last]                          # oldest first
    block = {i: len(sample.turns[i].thinking) + 2 for i in think_turns}      # body + <think> + </think>

    if irreducible_len(sample) > budget:                                      # step 4
        return TrimResult("dropped", None, None, total, 0)

    keep: list[int | None] = [len(t.thinking) if t.thinking is not None else None for t in sample.turns]
    used = irreducible_len(sample) + sum(block[i] for i in earlier)
    n_dropped = 0
    for i in earlier:                                                         # step 3
        if used <= budget:
            break
        used -= block[i]
        keep[i] = None
        n_dropped += 1
    if last is not None:                                                      # step 2 (repeated after step 3)
        keep[last] = min(len(sample.turns[last].thinking), budget - used)
    ids, mask = sample.render(keep)
    return TrimResult("trimmed", ids, mask, total, total - len(ids), n_dropped)


def trim_samples(samples: Iterable[EncodedSample], budget: int) -> tuple[list[TrimResult], TrimStats]:
    """Trim every sample for one budget; results are in input order (dropped ones included, with `ids=None`)."""
    stats = TrimStats(budget)
    results = []
    for s in samples:
        r = trim(s, budget)
        stats.add(r)
        results.append(r)
    return results, stats


def trim_per_budget(samples: Sequence[EncodedSample], budgets: Sequence[int]) -> dict[int, tuple[list[TrimResult], TrimStats]]:
    """Re-apply trimming per context stage (paper: 4K -> 32K -> 131K), each from the original samples."""
    bad = [b for b in budgets if not isinstance(b, int) or b <= 0]
    if bad:
        raise ValueError(f"context budgets must be positive integers, got {bad}")
    return {b: trim_samples(samples, b) for b in budgets}
