"""Byte-level BPE tokenizer with the project's special tokens and chat template, and how any text or chat becomes ids.

Notable features:
- Trained offline with `tokenizers` in seconds on an iterator of texts (no hub download: tiktoken and hub tokenizers
  fetch at run time, environment.md section 3).
- Pre-tokenizer = split every ASCII digit into its own piece, then GPT-2 style ByteLevel. Every digit is therefore
  one token, so numbers are read and written digit by digit (what the arithmetic chains of thought rely on), and any
  byte string round-trips exactly.
- Special tokens with fixed ids: `<pad>`=0, `<bos>`, `<eos>`, `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`,
  `<think>`, `</think>` (ids 0..8, the order of `SPECIAL_TOKENS`). `eos_token` is `<|end|>` because generation stops
  at the end of the assistant turn; pretraining documents are `<bos>{text}<eos>` (`encode_document`).
- The vocabulary is padded with `<reserved_k>` tokens to a multiple of 64 (embedding/LM-head matmuls like it).
- A Jinja chat template with `{% generation %}` markers, so TRL's `assistant_only_loss` can find the assistant span
  (environment.md appendix section 5); `encode_chat`/`encode_messages` build the same ids and the assistant mask
  directly, piece by piece, for our own SFT code.
- Encoding for every other module: `encode_text` (plain text, no template), `chat_ids` (the chat format's special
  ids, checked present), `stop_ids` (what ends a completion); they work with an HF fast tokenizer or a raw
  `tokenizers.Tokenizer`.
- `save_tokenizer` is atomic (temp dir, then rename); `load_tokenizer` names the missing file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from zaya_lib.utils import atomic_dir

__all__ = [
    "SPECIAL_TOKENS", "VOCAB_MULTIPLE", "CHAT_TEMPLATE", "train_tokenizer", "save_tokenizer", "load_tokenizer",
    "ChatIds", "chat_ids", "encode_text", "stop_ids", "encode_chat", "encode_messages", "encode_document",
    "render_chat",
]

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
THINK, END_THINK = "<think>", "</think>"
# Order fixes the ids: <pad> must be 0 (the brief's convention), the rest follow.
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END, THINK, END_THINK]
VOCAB_MULTIPLE = 64
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

# `<bos>` once, then each turn `<|role|>content<|end|>`; the assistant content and its closing `<|end|>` sit inside
# {% generation %} so TRL's assistant-only loss covers exactly what `encode_messages` masks.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ m['content'] }}<|end|>{% endgeneration %}"
    "{% elif m['role'] in ['user', 'system'] %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
    "{% else %}{{ raise_exception('unknown chat role: ' + m['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _build_backend() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # Isolate each ASCII digit: no merge can ever span two digits (or a digit and a letter).
        pre_tokenizers.Split(Regex(r"[0-9]"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on `texts` and wrap it as a `PreTrainedTokenizerFast`.

    `vocab_size` is the BPE target including the special tokens; the result is then padded with `<reserved_k>`
    tokens to the next multiple of 64, so `len(tok)` may exceed it by up to 63 (or fall short of it on a small
    corpus, where BPE runs out of merges before the target).
    """
    min_size = len(SPECIAL_TOKENS) + 256  # specials + the 256-symbol byte alphabet
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} is below the minimum {min_size} (specials + 256 bytes)")
    backend = _build_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):  # the trainer adds specials first, in order; check rather than trust
        if backend.token_to_id(t) != i:
            raise RuntimeError(f"special token {t!r} got id {backend.token_to_id(t)}, expected {i}")
    n = backend.get_vocab_size()
    n_reserved = (-n) % VOCAB_MULTIPLE
    backend.add_special_tokens([f"<reserved_{k}>" for k in range(n_reserved)])
    return _wrap(backend)


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=END,
        additional_special_tokens=[EOS, SYSTEM, USER, ASSISTANT, THINK, END_THINK],
        clean_up_tokenization_spaces=False,
    )
    tok.padding_side = "left"  # generation batches are left-padded (the model handles left padding)
    tok.chat_template = CHAT_TEMPLATE
    if len(tok) % VOCAB_MULTIPLE:
        raise RuntimeError(f"vocabulary size {len(tok)} is not a multiple of {VOCAB_MULTIPLE}")
    return tok


def save_tokenizer(tok: PreTrainedTokenizerFast, path: str | os.PathLike) -> Path:
    """Save in Hugging Face format to directory `path`, atomically: a reader sees the old or the new tokenizer."""
    path = Path(path)
    with atomic_dir(path) as tmp:
        tok.save_pretrained(str(tmp))
    return path


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by `save_tokenizer`; a missing directory or file is named in the error."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} does not exist (train and save_tokenizer first)")
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{str(path / 'tokenizer.json')!r} is missing: {str(path)!r} is not a saved tokenizer")
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.convert_tokens_to_ids(t) != i:
            raise ValueError(f"tokenizer at {str(path)!r}: special token {t!r} has id "
                             f"{tok.convert_tokens_to_ids(t)}, expected {i}")
    tok.padding_side = "left"
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


# ---------------------------------------------------------------------------------------------------------------------
# encoding: how any text or chat becomes ids (an HF fast tokenizer or a raw `tokenizers.Tokenizer` with our specials)


class ChatIds(NamedTuple):
    """Ids of the chat format's special tokens (brief: `<pad>` is id 0, `<|end|>` ends a turn and stops generation)."""
    pad: int
    bos: int
    eos: int
    system: int
    user: int
    assistant: int
    end: int
    think: int
    end_think: int

    def role(self, role: str) -> int:
        return {"system": self.system, "user": self.user, "assistant": self.assistant}[role]


_CHAT_TOKENS = dict(zip(ChatIds._fields, SPECIAL_TOKENS))  # field name -> token string, in id order


def chat_ids(tokenizer: Any) -> ChatIds:
    """Look up every special token of our chat format; a tokenizer missing one raises naming it."""
    if hasattr(tokenizer, "token_to_id"):            # raw tokenizers.Tokenizer: None when absent
        lookup = tokenizer.token_to_id
    elif hasattr(tokenizer, "convert_tokens_to_ids"):  # HF tokenizer: None (no unk) or the unk id when absent
        unk = getattr(tokenizer, "unk_token_id", None)

        def lookup(tok: str) -> int | None:
            i = tokenizer.convert_tokens_to_ids(tok)
            return None if unk is not None and i == unk else i
    else:
        raise TypeError(f"expected a tokenizers.Tokenizer or a Hugging Face tokenizer, got {type(tokenizer).__name__}")
    found = {name: lookup(tok) for name, tok in _CHAT_TOKENS.items()}
    missing = [_CHAT_TOKENS[name] for name, i in found.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks the special tokens {missing}; train it with zaya_lib.data.tokenizer")
    return ChatIds(**found)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of plain text, without bos/eos or any template (works for both tokenizer kinds). Special-token
    strings inside `text` (e.g. `<think>`) become their single ids; empty text (or None) is no ids."""
    if not text:
        return []
    out = tokenizer.encode(text, add_special_tokens=False)
    return list(out.ids) if hasattr(out, "ids") else list(out)


def stop_ids(tokenizer: Any) -> list[int]:
    """Token ids that end a completion: `<|end|>` (the turn's end) and any other turn-structure token a weak model may
    emit instead (`<eos>`, `<bos>`, role markers); tails must never contain them (`aggregation._validate`)."""
    ids = chat_ids(tokenizer)
    return [ids.end, ids.eos, ids.bos, ids.user, ids.system, ids.assistant]


def encode_messages(tok: PreTrainedTokenizerFast, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a chat rendered as `CHAT_TEMPLATE` does, and a 0/1 mask that is 1 exactly on the assistant
    contents and their closing `<|end|>` (what SFT puts loss on). Built piece by piece, not by re-parsing text;
    special tokens split the text, so the pieces tokenise exactly as the rendered string does."""
    sid = tok.convert_tokens_to_ids
    ids, mask = [sid(BOS)], [0]
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLE_TOKENS:
            raise ValueError(f"message {i}: unknown chat role {role!r}; expected one of {sorted(ROLE_TOKENS)}")
        body = encode_text(tok, m["content"]) + [sid(END)]
        ids += [sid(ROLE_TOKENS[role])] + body
        mask += [0] + [int(role == "assistant")] * len(body)
    return ids, mask


def encode_chat(tok: PreTrainedTokenizerFast, question: str, response: str | None = None,
                system: str | None = None) -> tuple[list[int], list[int]]:
    """`<bos>[<|system|>..<|end|>]<|user|>{question}<|end|><|assistant|>[{response}<|end|>]` as (ids, assistant_mask).

    With `response=None` this is the generation prompt (ending in `<|assistant|>`, mask all zero).
    """
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + [{"role": "user", "content": question}]
    if response is None:
        ids, mask = encode_messages(tok, msgs)
        return ids + [tok.convert_tokens_to_ids(ASSISTANT)], mask + [0]
    return encode_messages(tok, msgs + [{"role": "assistant", "content": response}])


def render_chat(question: str, response: str | None = None) -> str:
    """The chat as text (same string as the chat template renders); `response=None` gives the generation prompt."""
    head = f"{BOS}{USER}{question}{END}{ASSISTANT}"
    return head if response is None else f"{head}{response}{END}"


def encode_document(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """A pretraining document: `<bos>{text}<eos>`."""
    return [tok.convert_tokens_to_ids(BOS)] + encode_text(tok, text) + [tok.convert_tokens_to_ids(EOS)]
