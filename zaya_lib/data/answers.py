"""The project's one answer rule: how an answer is read from a completion and judged against the gold one.

Training (held-out pass@1, self-aggregation targets), test-time compute (RSA's votes) and RL (environments and rewards)
all read answers here, so they agree on what a model answered.

Notable features:
- One extraction rule (BRIEF "Answers"): strip turn-structure tokens, keep the text after the last `</think>` (the
  whole text if there is none), take the last `\\boxed{...}` with *balanced* braces (also `\\fbox`), else the last
  `<answer>...</answer>`. Code answers are the last fenced ```python block of the same final segment. Extractors are
  pure string scans, bounded in work, and never raise.
- Completions may be strings or chat message lists (TRL's conversational form); `completion_to_text` joins the
  assistant contents.
- Math judging: a fast exact/numeric pre-check (normalised strings, integers/decimals/fractions, thousands
  separators, `x = 3`) settles most cases; the rest goes to `math_verify.parse`/`verify` under a time limit
  (math-verify's SIGALRM timeout in the main thread; off the main thread signals are unavailable, so we only send
  short strings to it). Any exception counts as "not equal": a judge never crashes its caller.
- reasoning-gym: the dataset's own `score_answer` (spec section 7) on the extracted answer.
"""
from __future__ import annotations

import json
import math
import re
import threading
from fractions import Fraction
from functools import lru_cache
from typing import Any

__all__ = [
    "STRIPPED_TOKENS", "strip_special_tokens", "completion_to_text", "final_segment", "extract_boxed",
    "extract_answer_tag", "extract_answer", "extract_code", "math_equal", "score_math", "cell_dict",
    "score_reasoning_gym", "skips_thinking",
]

STRIPPED_TOKENS = ("<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<eos>", "<bos>", "<pad>")
MAX_TEXT_CHARS = 200_000  # completions longer than this are judged on their last MAX_TEXT_CHARS characters
_MAX_BOX_TRIES = 32  # at most this many `\boxed{` openings are scanned from the end (bounds worst-case work)


# ---------------------------------------------------------------------------------------------------- extraction
def strip_special_tokens(text: str) -> str:
    """`text` without the turn-structure tokens (`<think>`/`</think>` stay: they split the answer off)."""
    for tok in STRIPPED_TOKENS:
        text = text.replace(tok, "")
    return text


def skips_thinking(text: str) -> bool:
    """True when a response answers without reasoning: its think block is empty (`<think></think>\\boxed{7}`).
    A response with reasoning, or without any `</think>`, is not counted as skipping."""
    head, sep, _ = strip_special_tokens(text).partition("</think>")
    return bool(sep) and not head.replace("<think>", "").strip()


def completion_to_text(completion: Any) -> str:
    """A TRL completion as plain text: a string, or a chat list whose assistant messages' contents are joined
    (content may itself be a list of `{"type": "text", "text": ...}` parts)."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts: list[str] = []
    try:
        for msg in completion:
            if isinstance(msg, str):
                parts.append(msg)
                continue
            if not isinstance(msg, dict) or msg.get("role", "assistant") != "assistant":
                continue
            content = msg.get("content", "")
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            parts.append(str(content or ""))
    except TypeError:
        return str(completion)
    return "".join(parts)


def final_segment(text: str) -> str:
    """Special tokens stripped, then the text after the last `</think>` (the whole text if there is none)."""
    text = strip_special_tokens(text[-MAX_TEXT_CHARS:])
    i = text.rfind("</think>")
    return text[i + len("</think>"):] if i >= 0 else text


def _balanced_from(text: str, start: int) -> str | None:
    """Content of the brace group whose `{` is at text[start-1], or None if it never closes."""
    depth = 1
    for j in range(start, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[start:j]
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last complete `\\boxed{...}` / `\\fbox{...}` in `text` (balanced braces), or None."""
    if not isinstance(text, str):
        return None
    opens = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(opens[-_MAX_BOX_TRIES:]):
        inner = _balanced_from(text, start)
        if inner is not None:
            return inner.strip()
    return None


def extract_answer_tag(text: str) -> str | None:
    """Content of the last `<answer>...</answer>` in `text`, or None."""
    if not isinstance(text, str):
        return None
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    return text[start + len("<answer>"):end].strip() if start >= 0 else None


def extract_answer(completion: Any) -> str | None:
    """The project's answer rule: final segment, last balanced `\\boxed{}`, else last `<answer>` tag."""
    seg = final_segment(completion_to_text(completion))
    ans = extract_boxed(seg)
    return ans if ans is not None else extract_answer_tag(seg)


def extract_code(completion: Any) -> str | None:
    """The last fenced ```python (or ```py / bare ```) block in the final segment, or None."""
    seg = final_segment(completion_to_text(completion))
    blocks = re.findall(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", seg, flags=re.DOTALL | re.IGNORECASE)
    if not blocks:
        return None
    tagged = [b for lang, b in blocks if lang]
    return (tagged or [b for _, b in blocks])[-1]


# ---------------------------------------------------------------------------------------------------- math
_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |\\displaystyle|\$")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\{([^{}]*)\}")
_ASSIGN = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=\s*(?!.*=)")  # `x = 3`, `a_1 = 3` (single assignment)
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_FRAC = re.compile(r"^([+-]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")


def _normalise(s: str) -> str:
    s = _TEXT_WRAP.sub(r"\1", s)
    s = _LATEX_NOISE.sub("", s).strip()
    s = s.rstrip(".").strip()
    s = _ASSIGN.sub("", s)
    s = re.sub(r"\^\{?\\circ\}?", "", s)
    s = re.sub(r"\s+", "", s)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def _to_number(s: str) -> Fraction | None:
    """An exact rational for integers, decimals, `a/b` and `\\frac{a}{b}` (after normalisation), else None."""
    m = _FRAC.match(s)
    if m:
        s = f"{m.group(1)}({m.group(2)})/({m.group(3)})"
    s = s.replace("(", "").replace(")", "") if re.fullmatch(r"[+-]?\(?[\d.]+\)?/\(?[\d.]+\)?", s) else s
    if len(s) > 60 or not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)(/[+-]?(\d+(\.\d*)?|\.\d+))?", s):
        return None
    try:
        num, _, den = s.partition("/")
        value = Fraction(num) / Fraction(den) if den else Fraction(num)
        return value
    except (ValueError, ZeroDivisionError):
        return None


@lru_cache(maxsize=4096)
def _mv_parse(s: str, timeout: int | None):
    """math_verify.parse of `s` (cached: the gold answer repeats across a group of generations)."""
    from math_verify import parse

    out = parse(f"${s}$", parsing_timeout=timeout, raise_on_error=False)
    if not out:
        out = parse(s, parsing_timeout=timeout, raise_on_error=False)
    return out


def math_equal(pred: str | None, gold: Any, timeout_s: int = 2) -> bool:
    """Is `pred` (an extracted answer string) mathematically equal to `gold`? Never raises."""
    if pred is None or gold is None:
        return False
    try:
        gold = str(gold)
        p, g = _normalise(pred), _normalise(gold)
        if not p:
            return False
        if p == g:
            return True
        pn, gn = _to_number(p), _to_number(g)
        if pn is not None and gn is not None:
            if pn == gn:
                return True
            # math-verify rounds floats (6 digits): only clearly different numbers are settled here
            if abs(pn - gn) > Fraction(1, 10**4) * max(1, abs(gn)):
                return False
        if gn is not None and not re.search(r"[\d\\]", pred):
            return False  # a number can only equal something with a digit or a LaTeX command (\pi, \infty)
        in_main = threading.current_thread() is threading.main_thread()
        if not in_main and (len(pred) > 200 or len(gold) > 200):
            return False  # no signal-based timeout off the main thread: refuse long inputs instead
        timeout = max(1, int(math.ceil(timeout_s))) if in_main else None
        from math_verify import verify

        gp, pp = _mv_parse(gold, timeout), _mv_parse(pred, timeout)
        if not gp or not pp:
            return False
        return bool(verify(gp, pp, timeout_seconds=timeout, raise_on_error=False))
    except Exception:  # math-verify/sympy raise many kinds (incl. its TimeoutException); a judge must not crash
        return False


def score_math(completion: Any, gold: Any) -> float:
    return float(math_equal(extract_answer(completion), gold))


# ---------------------------------------------------------------------------------------------------- reasoning-gym
def cell_dict(x: Any) -> dict:
    """A dataset cell that holds a dict: the dict itself, or a JSON string of one; anything else gives {}."""
    if x is None:
        return {}
    if isinstance(x, dict):
        return x
    if isinstance(x, str):
        try:
            out = json.loads(x)
            return out if isinstance(out, dict) else {}
        except json.JSONDecodeError:
            return {}
    return {}


def score_reasoning_gym(completion: Any, entry: dict, task: str | None = None) -> float:
    """reasoning-gym's own scorer for dataset `task` (or `entry['metadata']['source_dataset']`) on our extracted
    answer. `entry` is a reasoning-gym entry dict (question/answer/metadata). Errors score 0."""
    import reasoning_gym

    name = task or cell_dict(entry.get("metadata")).get("source_dataset")
    if not name:
        raise KeyError("score_reasoning_gym: no task name (pass `task` or metadata.source_dataset)")
    fn = reasoning_gym.get_score_answer_fn(name)  # raises for an unknown dataset name: a config error
    ans = extract_answer(completion)
    try:
        return float(fn(ans, entry))
    except Exception:
        return 0.0
