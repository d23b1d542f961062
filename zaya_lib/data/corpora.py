"""Offline pretraining/SFT corpora by category, as `datasets.Dataset`s, plus loaders for the paper's public datasets.

Notable features:
- Four categories, built from what is on the machine (nothing is downloaded; issue 4):
  "web"      English prose from the Python installation: `pydoc_data.topics` (the Python reference manual), the
             standard library's text files (LICENSE, idlelib's README/NEWS/help) and stdlib docstrings (read as text,
             never imported: importing arbitrary stdlib modules has side effects, e.g. `antigravity` opens a browser);
             past those (~1,170 documents) the docstrings of three fixed dependencies, `_DOC_PACKAGES` (torch, numpy,
             sympy; pinned by constraints.txt). Nothing else installed is read, so installing or upgrading other
             packages changes no document (it once sampled every package's README and license: a different package
             set changed the sample and flipped a content test).
  "code"     Python source of the standard library (tests excluded), cut at blank lines.
  "math"     reasoning tasks (`tasks.py`) rendered as chats with their compact chain of thought.
  "instruct" instruction-formatted dialogues: task questions under varied instructions, simple verifiable
             instruction-following items (repeat, upper/lower case, reverse, sort, count words, JSON), and two-turn chats.
- One schema for every corpus (so mixtures concatenate): `text`, `category`, `source`, `messages` (list of
  {role, content}; empty for web/code) and `answer` (gold answer or ""). `text` never contains `<bos>`/`<eos>`:
  pretraining wraps every document as `<bos>{text}<eos>`; chats are `<|user|>..<|end|><|assistant|>..<|end|>` and SFT
  encodes `messages` with `tokenizer.encode_messages` for the assistant mask.
- Deterministic given (n, seed) and the Python version (and, beyond the stdlib's prose, the pinned packages); fast (stdlib files are parsed lazily, only as many as
  needed); nothing is cached on disk.
- `load_openmathreasoning` / `load_rstar_coder` map the public schemas (nvidia/OpenMathReasoning: `problem`,
  `generated_solution`, `expected_answer`, `inference_mode`, ...; microsoft/rStar-Coder: `question`, `response`,
  `code`, ...) to the same schema, from the hub or a local parquet/jsonl file or folder.
"""
from __future__ import annotations

import importlib.util
import inspect
import os
import itertools
import random
import re
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from datasets import Dataset, Features, Value, load_dataset

from .tasks import MAX_DIFFICULTY, TASKS, format_response, make_problems
from .tokenizer import END, END_THINK, ROLE_TOKENS, THINK

__all__ = [
    "CATEGORIES", "FEATURES", "web_corpus", "code_corpus", "math_corpus", "instruct_corpus", "build_corpora",
    "chat_text", "load_openmathreasoning", "load_rstar_coder",
]

CATEGORIES = ("web", "code", "math", "instruct")
FEATURES = Features({
    "text": Value("string"),
    "category": Value("string"),
    "source": Value("string"),
    "messages": [{"role": Value("string"), "content": Value("string")}],
    "answer": Value("string"),
})


def chat_text(messages: list[dict]) -> str:
    """A chat as text without `<bos>`: `<|user|>q<|end|><|assistant|>r<|end|>...` (the chat template minus bos)."""
    out = []
    for i, m in enumerate(messages):
        if m["role"] not in ROLE_TOKENS:
            raise ValueError(f"message {i}: unknown chat role {m['role']!r}")
        out.append(f"{ROLE_TOKENS[m['role']]}{m['content']}{END}")
    return "".join(out)


def _row(text: str, category: str, source: str, messages=(), answer: str = "") -> dict:
    return {"text": text, "category": category, "source": source, "messages": list(messages), "answer": answer}


def _chat_row(messages: list[dict], category: str, source: str, answer: str = "") -> dict:
    return _row(chat_text(messages), category, source, messages, answer)


def _dataset(rows: list[dict]) -> Dataset:
    return Dataset.from_list(rows, features=FEATURES)


def _check_n(n: int, what: str) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{what}: n must be a positive int, got {n!r}")


# --------------------------------------------------------------------------------------------------------------------
# Text sources on this machine


def _chunks(text: str, max_chars: int, min_chars: int) -> list[str]:
    """Cut at blank lines into pieces of at most `max_chars` (a longer paragraph is cut at whitespace)."""
    pieces, cur = [], ""
    for para in re.split(r"\n\s*\n", text.strip()):
        while len(para) > max_chars:
            cut = para.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            pieces.append(para[:cut])
            para = para[cut:].lstrip()
        if cur and len(cur) + 2 + len(para) > max_chars:
            pieces.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        pieces.append(cur)
    return [p for p in pieces if len(p) >= min_chars]


_FUNCTION_WORDS = frozenset("the of and to is a in that for it as be are this with or by not an on".split())


def _is_prose(text: str) -> bool:
    """English-looking prose: mostly ASCII letters and spaces, few markup/code symbols, and English function words
    at least 10% of the words (real prose: 20-30%; code, tables and doctests: a few %)."""
    words = text.lower().split()
    if not words or sum(w in _FUNCTION_WORDS for w in words) / len(words) < 0.10:
        return False
    letters = sum(c.isascii() and (c.isalpha() or c in " ,.;:'\"()-\n") for c in text)
    return letters / len(text) > 0.85 and sum(c in "{}<>=_|#[]`$\\" for c in text) / len(text) < 0.06


def _dedupe_key(text: str) -> str:
    """Near-duplicate key: letters only, copyright lines dropped (license texts differ mostly in those)."""
    body = "\n".join(ln for ln in text.lower().splitlines() if "copyright" not in ln)
    return re.sub(r"[^a-z]+", "", body)


_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "testing", "idle_test", "__pycache__", "lib2to3",
              "turtledemo", "_vendor", "vendored", "encodings", "pydoc_data"}  # codec tables and the giant topics dict


def _py_files(root: Path) -> tuple[Path, ...]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)  # prune tests and nested installs
        out += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return tuple(out)


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[Path, ...]:
    return _py_files(Path(sysconfig.get_paths()["stdlib"]))


# Packages whose docstrings extend the web corpus once the standard library's prose is used up: fixed (never "whatever
# is installed"), pinned by constraints.txt, and read last, so the first ~1,170 documents come from the Python
# installation alone. ~3,200 prose pieces between them (torch ~1,800, sympy ~800, numpy ~560): the tiny profile needs
# ~3,050 web documents.
_DOC_PACKAGES = ("torch", "numpy", "sympy")


@lru_cache(maxsize=1)
def _package_files() -> tuple[Path, ...]:
    """Python files of `_DOC_PACKAGES` (located, not imported)."""
    out = []
    for name in _DOC_PACKAGES:
        spec = importlib.util.find_spec(name)
        for d in (spec.submodule_search_locations or []) if spec is not None else []:
            out += _py_files(Path(d))
    return tuple(out)


@lru_cache(maxsize=1)
def _stdlib_texts() -> tuple[tuple[str, str], ...]:
    """(source, text) of the standard library's prose files: LICENSE.txt, idlelib's README/NEWS/HISTORY/help, ..."""
    out = []
    for dirpath, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for f in sorted(filenames):
            if f.endswith((".txt", ".rst", ".html")):
                text = (Path(dirpath) / f).read_text(encoding="utf-8", errors="replace")
                out.append(("stdlib-text:" + Path(dirpath).name + "/" + f, _strip_markup(text)))
    return tuple(out)


def _strip_markup(text: str) -> str:
    """Drop badges, images, link targets and bare URLs from a Markdown/reST README, keeping the words."""
    text = re.sub(r"\[?!\[[^\]]*\]\([^)]*\)(\]\([^)]*\))?", "", text)  # [![badge](img)](link), ![img](src)
    text = re.sub(r"\]\((https?://|#)[^)]*\)", "]", text)  # [text](url) -> [text]
    text = re.sub(r"<[^>\n]+>", "", text)  # inline HTML tags
    return re.sub(r"https?://\S+", "", text)


# A docstring: a triple-quoted string opening a module (after comments) or right after a `def`/`class` header line.
# A regex instead of `ast.parse`: ~20x faster over the stdlib, and a missed docstring (multi-line signature) only
# costs a little prose.
_DOC_RE = re.compile(r"""(?:\A(?:[ \t]*(?:#[^\n]*)?\n)*|(?:def|class)[ \t][^\n]*:[ \t]*\n)[ \t]*[rRuU]?("{3}|'{3})(.*?)\1""",
                     re.DOTALL)


def _docstrings(path: Path) -> str:
    try:
        src = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""
    # Keep the prose before any doctest example (`>>>` sessions are code, not English).
    docs = (inspect.cleandoc(m.group(2)).split(">>>", 1)[0].rstrip() for m in _DOC_RE.finditer(src))
    return "\n\n".join(d for d in docs if len(d) > 80)


def web_corpus(n: int, seed: int = 0, max_chars: int = 2000, min_chars: int = 200) -> Dataset:
    """`n` English prose documents (category "web"): the Python reference manual's topics, the standard library's
    text files and its docstrings, interleaved in a seeded order and cut into <= `max_chars` pieces; then, if more
    are asked, docstrings of `_DOC_PACKAGES`."""
    _check_n(n, "web_corpus")
    import pydoc_data.topics

    rng = random.Random(f"web|{seed}")
    topics = [("pydoc_topics:" + k, v) for k, v in sorted(pydoc_data.topics.topics.items())]
    rng.shuffle(topics)
    texts = list(_stdlib_texts())
    rng.shuffle(texts)
    files = list(_stdlib_files())
    rng.shuffle(files)

    def pieces(items) -> Iterator[tuple[str, str]]:
        for src, text in items:
            for piece in _chunks(text, max_chars, min_chars):
                yield src, piece

    def docstrings(paths, prefix: str) -> Iterator[tuple[str, str]]:
        return ((prefix + f.stem, _docstrings(f)) for f in paths)

    def stream() -> Iterator[tuple[str, str]]:
        # Pieces round-robin over the three standard-library streams, so any prefix mixes reference prose, text files
        # and docstrings; the pinned packages' docstrings (walked and parsed only if needed) come last.
        streams = [pieces(topics), pieces(texts), pieces(docstrings(files, "docstrings:"))]
        while streams:
            for it in list(streams):
                item = next(it, None)
                if item is None:
                    streams.remove(it)
                else:
                    yield item
        more = list(_package_files())
        rng.shuffle(more)
        yield from pieces(docstrings(more, "pkg-docstrings:"))

    rows, seen = [], set()
    for src, piece in stream():
        key = _dedupe_key(piece)
        if _is_prose(piece) and key not in seen:
            seen.add(key)
            rows.append(_row(piece, "web", src))
            if len(rows) == n:
                return _dataset(rows)
    raise ValueError(f"web_corpus: only {len(rows)} prose documents exist on this machine, {n} asked")


def code_corpus(n: int, seed: int = 0, max_chars: int = 2000, min_chars: int = 200) -> Dataset:
    """`n` pieces of Python source (category "code") from the standard library, files in a seeded order."""
    _check_n(n, "code_corpus")
    files = list(_stdlib_files())
    random.Random(f"code|{seed}").shuffle(files)
    rows = []
    for f in files:
        try:
            src = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        rows += [_row(p, "code", "stdlib:" + f.stem) for p in _chunks(src, max_chars, min_chars)]
        if len(rows) >= n:
            break
    if len(rows) < n:
        raise ValueError(f"code_corpus: only {len(rows)} code pieces exist on this machine, {n} asked")
    return _dataset(rows[:n])


# --------------------------------------------------------------------------------------------------------------------
# Chats built from the tasks


def _spread(n: int, keys: list, rng: random.Random) -> list:
    """`n` keys, as evenly as possible, in a seeded order."""
    out = [keys[i % len(keys)] for i in range(n)]
    rng.shuffle(out)
    return out


def math_corpus(n: int, seed: int = 0, tasks: list[str] | None = None,
                difficulties: list[int] | None = None, nothink_frac: float = 0.0,
                nothink_tasks: list[str] | None = None) -> Dataset:
    """`n` reasoning chats (category "math"): training-split problems of `tasks` (default all) at `difficulties`
    (default 1..5), spread evenly, each `<|user|>question<|end|><|assistant|><think>cot</think>\\boxed{a}<|end|>`.
    Where a (task, level) has fewer distinct training problems than its share, they repeat.

    `nothink_frac`: the share of chats of `nothink_tasks` (None: every task) answered without reasoning,
    `<think></think>\\boxed{a}` (a hybrid-thinking mix, as in chat SFT data where many answers skip the reasoning;
    chosen with its own seeded stream, so the problems and their order do not depend on it). The response's source
    tag then ends in `:nothink`."""
    _check_n(n, "math_corpus")
    if not 0.0 <= nothink_frac <= 1.0:
        raise ValueError(f"math_corpus: nothink_frac must be in [0, 1], got {nothink_frac}")
    unknown = sorted(set(nothink_tasks or ()) - set(TASKS))
    if unknown:
        raise ValueError(f"math_corpus: unknown nothink_tasks {unknown}; known: {sorted(TASKS)}")
    style_rng = random.Random(f"math-style|{seed}")
    tasks = list(tasks or TASKS)
    difficulties = list(difficulties or range(1, MAX_DIFFICULTY + 1))
    rng = random.Random(f"math|{seed}")
    keys = _spread(n, [(t, d) for t in tasks for d in difficulties], rng)
    counts: dict = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    # a small question space (e.g. 2-digit x 1-digit at level 1) is cycled: its problems repeat, none is invented
    pools = {k: itertools.cycle(make_problems(k[0], c, seed=seed, difficulty=k[1], allow_fewer=True))
             for k, c in sorted(counts.items())}
    rows = []
    for k in keys:
        p = next(pools[k])
        nothink = (nothink_frac > 0.0 and (not nothink_tasks or p.task in nothink_tasks)
                   and style_rng.random() < nothink_frac)
        reply = format_response("", p.answer) if nothink else p.response()
        msgs = [{"role": "user", "content": p.question}, {"role": "assistant", "content": reply}]
        rows.append(_chat_row(msgs, "math", f"task:{p.task}:d{p.difficulty}" + (":nothink" if nothink else ""),
                              p.answer))
    return _dataset(rows)


@lru_cache(maxsize=1)
def _word_list() -> tuple[str, ...]:
    """Common lowercase English words from the Python reference manual (frequency >= 5, 3-9 letters)."""
    import pydoc_data.topics
    from collections import Counter

    c = Counter(w for t in pydoc_data.topics.topics.values() for w in re.findall(r"\b[a-z]{3,9}\b", t))
    return tuple(sorted(w for w, k in c.items() if k >= 5))


_TASK_WRAPPERS = ["{q}", "Please solve: {q}", "Question: {q}", "{q} Think step by step.", "Solve this. {q}",
                  "Here is a problem. {q} Put the final answer in a box."]
_COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def _instruction_item(rng: random.Random, words: tuple[str, ...]) -> tuple[str, str, str]:
    """(kind, prompt, reply) of a simple verifiable instruction."""
    kind = rng.choice(["repeat", "upper", "lower", "reverse", "sort", "count_words", "json", "first_letter", "bullets"])
    w = rng.choice(words)
    if kind == "repeat":
        k = rng.randrange(2, 6)
        return kind, f"Repeat the word {w} {_COUNT_WORDS[k]} times.", " ".join([w] * k)
    if kind == "upper":
        ws = rng.sample(words, rng.randrange(2, 5))
        return kind, f"Write in uppercase: {' '.join(ws)}", " ".join(ws).upper()
    if kind == "lower":
        ws = [x.capitalize() if rng.random() < 0.5 else x.upper() for x in rng.sample(words, rng.randrange(2, 5))]
        return kind, f"Write the answer in lowercase: {' '.join(ws)}", " ".join(ws).lower()
    if kind == "reverse":
        return kind, f"Spell the word {w} backwards.", w[::-1]
    if kind == "sort":
        ws = rng.sample(words, rng.randrange(3, 6))
        return kind, f"Sort these words alphabetically: {', '.join(ws)}.", ", ".join(sorted(ws))
    if kind == "count_words":
        ws = rng.sample(words, rng.randrange(2, 9))
        return kind, f'How many words are in "{" ".join(ws)}"? Answer with a number.', str(len(ws))
    if kind == "json":
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        return kind, f'What is {a}+{b}? Reply in JSON with the key "answer".', f'{{"answer": {a + b}}}'
    if kind == "first_letter":
        return kind, f"What is the first letter of the word {w}?", w[0]
    ws = rng.sample(words, rng.randrange(2, 5))
    return kind, f"List these words as bullet points: {', '.join(ws)}.", "\n".join(f"- {x}" for x in ws)


def instruct_corpus(n: int, seed: int = 0, p_task: float = 0.4, p_two_turn: float = 0.15,
                    p_system: float = 0.2) -> Dataset:
    """`n` instruction-formatted dialogues (category "instruct"): with probability `p_task` a reasoning task under a
    varied instruction wording (answer with CoT), else a simple verifiable instruction (plain reply); a fraction
    `p_two_turn` are two-turn chats and `p_system` start with a system message."""
    _check_n(n, "instruct_corpus")
    rng = random.Random(f"instruct|{seed}")
    words = _word_list()
    pool: dict[tuple[str, int], list] = {}  # (task, difficulty) -> unused problems, refilled 64 at a time
    task_names = sorted(TASKS)

    def task_turn() -> tuple[str, str, str, str]:
        t, d = rng.choice(task_names), rng.randrange(1, 4)
        if not pool.get((t, d)):
            pool[(t, d)] = make_problems(t, 64, seed=rng.randrange(2**31), difficulty=d)
        p = pool[(t, d)].pop()
        return "task:" + t, rng.choice(_TASK_WRAPPERS).format(q=p.question), p.response(), p.answer

    def turn() -> tuple[str, str, str, str]:
        if rng.random() < p_task:
            return task_turn()
        kind, q, r = _instruction_item(rng, words)
        return "instr:" + kind, q, r, r

    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < p_system else []
        srcs, answer = [], ""
        for _ in range(2 if rng.random() < p_two_turn else 1):
            src, q, r, answer = turn()
            srcs.append(src)
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
        rows.append(_chat_row(msgs, "instruct", "+".join(srcs), answer))
    return _dataset(rows)


def build_corpora(n_per_category: int | dict[str, int], seed: int = 0) -> dict[str, Dataset]:
    """All four categories: `{category: Dataset}` with `n_per_category` documents each (an int or a dict)."""
    sizes = n_per_category if isinstance(n_per_category, dict) else {c: n_per_category for c in CATEGORIES}
    unknown = set(sizes) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"unknown corpus categories {sorted(unknown)}; known: {list(CATEGORIES)}")
    makers = {"web": web_corpus, "code": code_corpus, "math": math_corpus, "instruct": instruct_corpus}
    return {c: makers[c](n, seed=seed) for c, n in sizes.items()}


# --------------------------------------------------------------------------------------------------------------------
# Public datasets named by the paper (used on a machine that has them; tests use small local files)


def _load_any(path_or_name: str, split: str, n: int | None, **hub_kw) -> Dataset:
    """A local parquet/jsonl/json file or folder of them, or a hub dataset name (streamed when `n` is given)."""
    p = Path(path_or_name)
    if p.exists():
        files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.suffix in (".parquet", ".jsonl", ".json"))
        if not files:
            raise FileNotFoundError(f"{str(p)!r} holds no .parquet/.jsonl/.json files")
        kinds = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
        fmt = {kinds.get(f.suffix) for f in files}
        if None in fmt or len(fmt) != 1:
            raise ValueError(f"{str(p)!r}: expected only parquet or only json/jsonl files, got {sorted(f.name for f in files)}")
        ds = load_dataset(fmt.pop(), data_files=[str(f) for f in files], split="train")
        return ds.select(range(min(n, len(ds)))) if n is not None else ds
    if n is not None:
        stream = load_dataset(path_or_name, split=split, streaming=True, **hub_kw)
        return Dataset.from_list(list(stream.take(n)))
    return load_dataset(path_or_name, split=split, **hub_kw)


def _require(ds: Dataset, cols: list[str], where: str) -> None:
    missing = [c for c in cols if c not in ds.column_names]
    if missing:
        raise ValueError(f"{where}: missing columns {missing}; found {ds.column_names}")


def _as_reasoning(solution: str) -> str:
    """Our response format: the reasoning inside `<think>..</think>`, the final text after it. A solution without
    think tags is taken as all final text (an empty think block is added so the format holds)."""
    s = solution.strip()
    if END_THINK in s:
        head, tail = s.rsplit(END_THINK, 1)
        head = head.split(THINK, 1)[1] if THINK in head else head
        return f"{THINK}{head.strip()}{END_THINK}{tail.strip()}"
    return f"{THINK}{END_THINK}{s}"


def load_openmathreasoning(path_or_name: str = "nvidia/OpenMathReasoning", split: str = "cot",
                           n: int | None = None, inference_mode: str | None = "cot") -> Dataset:
    """OpenMathReasoning (columns `problem`, `generated_solution`, `expected_answer`, `inference_mode`,
    `problem_type`, `problem_source`, `generation_model`, ...) as "math" chats in our schema. Solutions keep their
    `<think>` reasoning; `\\boxed{expected_answer}` is appended when the final text has no `\\boxed{}`. Rows whose
    `inference_mode` differs from `inference_mode` (None: keep all) are dropped."""
    ds = _load_any(path_or_name, split, n)
    _require(ds, ["problem", "generated_solution", "expected_answer"], f"OpenMathReasoning at {path_or_name!r}")
    if inference_mode is not None and "inference_mode" in ds.column_names:
        ds = ds.filter(lambda r: r["inference_mode"] == inference_mode)

    def convert(r):
        resp = _as_reasoning(r["generated_solution"])
        if "\\boxed{" not in resp.rsplit(END_THINK, 1)[-1]:
            resp += f"\n\\boxed{{{r['expected_answer']}}}"
        msgs = [{"role": "user", "content": r["problem"].strip()}, {"role": "assistant", "content": resp}]
        return _chat_row(msgs, "math", "openmathreasoning:" + str(r.get("problem_source") or ""),
                         str(r["expected_answer"]))

    return ds.map(convert, remove_columns=ds.column_names, features=FEATURES)


def load_rstar_coder(path_or_name: str = "microsoft/rStar-Coder", config: str = "synthetic_sft",
                     split: str = "train", n: int | None = None, only_verified: bool = True) -> Dataset:
    """rStar-Coder SFT data as "code" chats in our schema. `synthetic_sft` has `question`, `seed_question`,
    `seed_source`, `response`, `code`; `seed_sft` has `question_id`, `question`, `starter_code`, `response`,
    `verified`, `is_passed`. The response (long reasoning, `<think>` kept) is the assistant turn; when it does not
    contain the final `code`, the code is appended as a fenced block. With `only_verified`, rows whose `is_passed`
    (or `verified`) is false are dropped."""
    p = Path(path_or_name)
    ds = _load_any(path_or_name, split, n, **({} if p.exists() else {"name": config}))
    _require(ds, ["question", "response"], f"rStar-Coder at {path_or_name!r}")
    if only_verified:
        for flag in ("is_passed", "verified"):
            if flag in ds.column_names:
                ds = ds.filter(lambda r: bool(r[flag]))
                break

    def convert(r):
        resp = _as_reasoning(r["response"])
        code = (r.get("code") or "").strip()
        if code and code not in resp:
            resp += f"\n```python\n{code}\n```"
        q = r["question"].strip()
        if (r.get("starter_code") or "").strip():
            q += f"\n\nStarter code:\n```python\n{r['starter_code'].strip()}\n```"
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": resp}]
        return _chat_row(msgs, "code", "rstar-coder:" + str(r.get("seed_source") or config), "")

    return ds.map(convert, remove_columns=ds.column_names, features=FEATURES)
