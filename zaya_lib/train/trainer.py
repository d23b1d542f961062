"""The training loop of the pretraining and midtraining phases: short, readable, resumable, data-parallel.

Shape legend: N windows, T context, B global batch rows, b rows on this rank, V vocabulary, K categories.

Notable features:
- Data is a `TrainData`: packed windows [N, T+1] (inputs [:, :-1], labels [:, 1:]), the category of every token
  (loss per category), an optional loss mask and the document of every token. Batch s is a pure function of
  (seed, s): rows s*B .. s*B+B-1 of a chain of seeded per-epoch permutations. The data position is therefore just
  the step; nothing to replay.
- Document masking (`TrainConfig.doc_mask`): every document of a window is computed as if alone
  (`zaya_lib.model.documents`: attention, conv history and value delay restart at each document, positions too) and
  no target crosses a document boundary.
- Muon + ExpertMuon + AdamW (`optim.py`) with a warmup-stable-decay schedule, gradient clipping, fp32 on the CPU and
  bf16 autocast on a GPU (weights, optimizer states and the residual stream stay fp32).
- The loss is the sum of token cross-entropies divided by the GLOBAL number of target tokens of the step, so
  micro-batching, DDP/FSDP2 ranks and context-parallel chunks all produce the gradient of one big batch.
- The aux-loss-free balancing update [TR eq. 5] after every step, from routing counts summed over all ranks
  (`balance=False` turns it off for the "without balancing" comparison; counts are still logged).
- Metrics, one JSON line per logged step in `metrics_path`: loss overall and per category, lr, grad norm, tokens/s,
  routing statistics (max/mean load, active experts, router entropy, per-layer expert load).
- Checkpoints `ckpt_dir/step-XXXXXXXX/` hold the model, every optimizer, the balancer, the step (= schedule and data
  position), the RNG states and the metrics log up to that step. Each is written to a hidden temp dir, fsynced, and
  renamed in one `os.replace`: a kill at any instant leaves either the previous or the new checkpoint, never a
  partial one. `resume=True` continues from the newest one and reproduces the uninterrupted run exactly on the CPU
  (tests/test_trainer.py kills a real run with SIGKILL).
- Distributed: under `torchrun` the same call runs data-parallel (DDP, or FSDP2 `fully_shard` with
  `parallel="fsdp"`); rank r takes rows r, r + world, ... of the global batch. With `cp_world_size > 1` the ranks
  form (data, context) groups and each context rank holds a contiguous chunk of every sequence
  (`context_parallel.ContextParallel`).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..utils import atomic_write_text, progress
from . import distributed as dist_utils
from .optim import Optimizers, build_optimizers, wsd_lr

__all__ = ["TrainData", "TrainConfig", "train", "encode_for_training", "build_train_data", "batch_indices",
           "latest_checkpoint", "load_checkpoint", "check_context_budget", "check_phase_params", "pick_threads"]


# ---------------------------------------------------------------------------------------------------------------------
# data


@dataclass
class TrainData:
    """Packed training windows. `category_NT1[i, t]` is the category index of token t (a label's category is that of
    the token it predicts); `loss_mask_NT1` (optional) is 1 where a token is a training target; `doc_ids_NT1`
    (optional) identifies the document of every token (a document = a run of equal ids; `TrainConfig.doc_mask`)."""

    tokens_NT1: torch.Tensor
    category_NT1: torch.Tensor
    categories: list[str]
    loss_mask_NT1: torch.Tensor | None = None
    doc_ids_NT1: torch.Tensor | None = None

    def __post_init__(self):
        if self.tokens_NT1.ndim != 2 or self.tokens_NT1.shape[1] < 2:
            raise ValueError(f"tokens_NT1 must be [N, T+1] with T >= 1, got {tuple(self.tokens_NT1.shape)}")
        if self.category_NT1.shape != self.tokens_NT1.shape:
            raise ValueError(f"category_NT1 {tuple(self.category_NT1.shape)} must match tokens_NT1 "
                             f"{tuple(self.tokens_NT1.shape)}")
        if self.loss_mask_NT1 is not None and self.loss_mask_NT1.shape != self.tokens_NT1.shape:
            raise ValueError(f"loss_mask_NT1 {tuple(self.loss_mask_NT1.shape)} must match tokens_NT1")
        if self.doc_ids_NT1 is not None and self.doc_ids_NT1.shape != self.tokens_NT1.shape:
            raise ValueError(f"doc_ids_NT1 {tuple(self.doc_ids_NT1.shape)} must match tokens_NT1")
        if len(self.tokens_NT1) and int(self.category_NT1.max()) >= len(self.categories):
            raise ValueError(f"category index {int(self.category_NT1.max())} >= {len(self.categories)} categories")

    @property
    def seq_len(self) -> int:
        return self.tokens_NT1.shape[1] - 1

    def __len__(self) -> int:
        return self.tokens_NT1.shape[0]

    @classmethod
    def from_documents(cls, docs: Sequence[Sequence[int]], doc_categories: Sequence[str], seq_len: int,
                       categories: Sequence[str] | None = None) -> "TrainData":
        """Concatenate tokenised documents (`<bos>...<eos>` or trimmed chats) in the given order and cut windows of
        T+1 tokens with stride T (`zaya_lib.data.packing.pack_pretraining`); categories and document indices (for
        `TrainConfig.doc_mask`) are packed the same way."""
        from ..data.packing import pack_pretraining

        if len(docs) != len(doc_categories):
            raise ValueError(f"{len(docs)} documents but {len(doc_categories)} categories")
        cats = list(categories) if categories is not None else sorted(set(doc_categories))
        missing = sorted(set(doc_categories) - set(cats))
        if missing:
            raise ValueError(f"document categories {missing} are not in categories={cats}")
        index = {c: i for i, c in enumerate(cats)}
        packed = pack_pretraining(docs, seq_len)
        cat_packed = pack_pretraining([[index[c]] * len(d) for d, c in zip(docs, doc_categories)], seq_len)
        doc_packed = pack_pretraining([[i] * len(d) for i, d in enumerate(docs)], seq_len)
        return cls(packed.tokens_NT1, cat_packed.tokens_NT1, cats, doc_ids_NT1=doc_packed.tokens_NT1)

    def tokens_per_category(self) -> dict[str, int]:
        counts = torch.bincount(self.category_NT1[:, 1:].reshape(-1), minlength=len(self.categories))
        return {c: int(n) for c, n in zip(self.categories, counts)}


def encode_for_training(tokenizer, row: dict, budget: int):
    """One corpus row (schema of `zaya_lib.data.corpora`) as training ids, or None when trimming drops it.

    Chats (`messages` non-empty) are AP-trimmed to `budget - 1` tokens (`zaya_lib.data.trimming`: the tail of the last
    thinking block goes first, the answer is kept whole) and closed with `<eos>`; prose and code are `<bos>text<eos>`
    documents, which packing may cut across windows like any pretraining stream. Returns (ids, trim status)."""
    from ..data.tokenizer import chat_ids, encode_document
    from ..data.trimming import encode_turns, split_thinking, trim

    if not row.get("messages"):
        return encode_document(tokenizer, row["text"]), "document"
    turns = []
    for m in row["messages"]:
        if m["role"] == "assistant":
            thinking, answer = split_thinking(m["content"])
            turns.append({"role": "assistant", "content": answer, "thinking": thinking})
        else:
            turns.append({"role": m["role"], "content": m["content"]})
    ids = chat_ids(tokenizer)
    r = trim(encode_turns(tokenizer, turns, ids), budget - 1)
    return (None, r.status) if r.ids is None else (r.ids + [ids.eos], r.status)


def build_train_data(tokenizer, dataset, seq_len: int, categories: Sequence[str], trim_budget: int | None = None):
    """Tokenise (and AP-trim at `trim_budget`, default the context) every row of a mixture `Dataset`, then pack into
    windows of `seq_len`. Returns (TrainData, stats) with tokens per category and the trimming counts."""
    budget = trim_budget or seq_len
    docs, cats, status = [], [], {"document": 0, "kept": 0, "trimmed": 0, "dropped": 0}
    for row in dataset:
        ids, st = encode_for_training(tokenizer, row, budget)
        status[st] += 1
        if ids is not None:
            docs.append(ids)
            cats.append(row["category"])
    data = TrainData.from_documents(docs, cats, seq_len, categories)
    return data, {"tokens_per_category": data.tokens_per_category(), "trimming": status, "windows": len(data),
                  "budget": budget}


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Rows of global batch `step`: positions step*B .. step*B+B-1 in the chain of per-epoch permutations
    (epoch e is `randperm(n)` seeded by (seed, e)). A pure function: resuming needs only the step."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        if not out or epoch != out[-1][0]:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            out.append((epoch, torch.randperm(n, generator=g), []))
        out[-1][2].append(i)
    return torch.cat([perm[idx] for _, perm, idx in out])


# ---------------------------------------------------------------------------------------------------------------------
# config and validation


@dataclass
class TrainConfig:
    steps: int                      # optimizer steps of this phase
    batch_size: int = 16            # global batch (windows per step, over all data-parallel ranks)
    micro_batch_size: int = 0       # rows per forward on one rank (0 = the whole local batch at once)
    lr: float = 3e-3                # peak learning rate (Muon is RMS-matched to AdamW, so one lr for both)
    warmup_steps: int = 20
    decay_frac: float = 0.2         # last fraction of the steps decays linearly (WSD)
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    use_muon: bool = True
    muon_experts: bool = False      # per-expert Muon on the 3-D experts; off: on the CPU its NS costs more than the
                                    # experts' own forward+backward at batch 16x256 (measured), so AdamW takes them
    balance: bool = True            # aux-loss-free balancing-bias update every step
    log_every: int = 10
    ckpt_every: int = 0             # 0: only at the end
    keep_ckpts: int = 2
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"          # "bfloat16" = autocast on CUDA; weights stay fp32
    parallel: str = "ddp"           # data parallelism under torchrun: "ddp" | "fsdp"
    cp_world_size: int = 1          # context-parallel ranks per sequence (all-gather-KV; see context_parallel.py)
    compile: bool = False           # torch.compile the model's forward+backward (all but the expert GEMM block, whose
                                    # shapes change every step): `make bench` step 1.28-1.37x transformers' (eager:
                                    # 1.16-1.29x, median 1.28x) after a 10-46 s first step; for long runs, not the tiny phases
    doc_mask: bool = False          # every document of a packed window computed as if alone (needs
                                    # TrainData.doc_ids_NT1; params sft_doc_mask, default on; pretrain_doc_mask, off)
    desc: str = "train"

    def validate(self, seq_len: int | None = None, world_size: int = 1) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"invalid TrainConfig: {msg}")

        for k in ("steps", "batch_size", "log_every", "cp_world_size"):
            v = getattr(self, k)
            need(isinstance(v, int) and v > 0, f"{k} must be a positive int, got {v!r}")
        need(self.micro_batch_size >= 0, f"micro_batch_size must be >= 0, got {self.micro_batch_size}")
        need(self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0 <= self.warmup_steps, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        need(self.parallel in ("ddp", "fsdp"), f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        need(self.dtype in ("float32", "fp32", "bfloat16", "bf16"), f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        need(world_size % self.cp_world_size == 0,
             f"world size {world_size} is not a multiple of cp_world_size {self.cp_world_size}")
        dp = world_size // self.cp_world_size
        need(self.batch_size % dp == 0, f"batch_size {self.batch_size} is not divisible by {dp} data-parallel ranks")
        need(not (self.doc_mask and self.cp_world_size > 1),
             "doc_mask (document masking) is not implemented with context parallelism (cp_world_size > 1)")
        if seq_len is not None:
            need(seq_len % self.cp_world_size == 0,
                 f"context {seq_len} is not divisible by cp_world_size {self.cp_world_size}")


def check_context_budget(key: str, budget, longest_answer: int | None = None) -> int:
    """Validate a context budget from params before any work: a positive int, and (when known) at least the longest
    answer section that answer-preserving trimming must keep whole. Raises ValueError naming `key`."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"{key}: the context budget must be a positive integer number of tokens, got {budget!r}")
    if longest_answer is not None and budget < longest_answer:
        raise ValueError(f"{key}={budget} is impossible: the longest answer section (question, answer and markers, "
                         f"which trimming never cuts) is {longest_answer} tokens; raise {key} to at least that")
    return budget


def check_phase_params(prefix: str, mixture, context, batch_size, steps, longest_answer: int | None = None) -> None:
    """Fail fast on a phase's params (`pretrain_*`, `midtrain_*`): the mixture name and weights (validated by
    `zaya_lib.data.mixtures.resolve_mixture`), the context budget, the batch size and the step count. Every message
    names the offending key."""
    from ..data.mixtures import resolve_mixture

    try:
        resolve_mixture(mixture)
    except ValueError as e:
        raise ValueError(f"{prefix}_mixture: {e}") from None
    check_context_budget(f"{prefix}_context", context, longest_answer)
    for key, v in ((f"{prefix}_batch_size", batch_size), (f"{prefix}_steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{key} must be a positive int, got {v!r}")


def pick_threads(requested: int = 0) -> int:
    """torch CPU threads for training: `requested` if > 0, else min(2, cores). A FIXED number on purpose: the thread
    count changes how GEMMs split their sums, so a count read from the machine's load (as this once did) made the same
    seed give different numbers depending on what else ran (issue 18). Two threads on this project's 2-core machines;
    ask for 1 where other jobs compete for the cores (two spinning threads on one free core can crawl)."""
    if requested > 0:
        return int(requested)
    return max(1, min(2, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------------------------------
# checkpoints


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (`step-XXXXXXXX`); hidden temp dirs of an interrupted save are ignored."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    done = sorted(p for p in d.glob("step-*") if p.is_dir() and (p / "state.pt").is_file())
    return done[-1] if done else None


def _save_checkpoint(ckpt_dir: Path, step: int, state: dict, keep: int) -> Path:
    """Write `state` to ckpt_dir/step-XXXXXXXX atomically: temp dir, fsync, rename; then prune old ones."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=ckpt_dir))
    try:
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving the same step (a resumed run): move the old copy aside first
            shutil.rmtree(final)
        os.replace(tmp, final)
        dfd = os.open(ckpt_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself is durable
        finally:
            os.close(dfd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict:
    p = Path(path)
    f = p / "state.pt" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(p)!r} (expected {str(f)!r})")
    return torch.load(f, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------------------------------
# the loop


def _token_losses(model, inputs_bT, labels_bT, position_ids, cp, doc_ids=None) -> torch.Tensor:
    """Per-token cross entropy [b, T] in fp32 (labels already aligned with inputs; -100 = no target), through the
    model's fused head + cross-entropy (`targets=`; no [b, T, V] logits leave the model)."""
    kw = {"cp": cp, "position_ids": position_ids} if cp is not None else {}
    if doc_ids is not None:
        kw["doc_ids"] = doc_ids
    return model(input_ids=inputs_bT, targets=labels_bT, **kw).token_losses


def _routing_summary(stats: list[dict]) -> dict:
    return {
        "route_max_over_mean": float(np.mean([s["max_over_mean"] for s in stats])),
        "route_active_experts": float(np.mean([s["active_experts"] for s in stats])),
        "route_entropy": float(np.mean([s["router_entropy"] for s in stats])),
        "route_load": [[round(x, 5) for x in s["load"]] for s in stats],  # [L][E] fraction of tokens per expert
    }


def train(model, data: TrainData, cfg: TrainConfig, ckpt_dir: str | os.PathLike | None = None,
          metrics_path: str | os.PathLike | None = None, resume: bool = True,
          on_log: Callable[[dict], None] | None = None) -> list[dict]:
    """Train `model` (a `ZayaForCausalLM`) on `data` for `cfg.steps` steps; returns the logged records.

    Under torchrun every rank calls this with the same arguments; rank 0 writes checkpoints and metrics.
    """
    info = dist_utils.current()
    cfg.validate(data.seq_len, info.world_size)
    if cfg.doc_mask and data.doc_ids_NT1 is None:
        raise ValueError("invalid TrainConfig: doc_mask needs the documents of the windows (TrainData.doc_ids_NT1, "
                         "set by TrainData.from_documents and pack_sft_data)")
    dev = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model.to(dev)
    model.train()
    raw_model = model
    dp_rank, dp_size, cp = info.rank, info.world_size, None
    if cfg.cp_world_size > 1:
        from .context_parallel import ContextParallel, check_divisible  # the context-parallelism helper's module

        check_divisible(data.seq_len, cfg.cp_world_size)
        dp_rank, cp_rank = divmod(info.rank, cfg.cp_world_size)
        dp_size = info.world_size // cfg.cp_world_size
        cp = ContextParallel(group=dist_utils.context_parallel_group(cfg.cp_world_size))
    wrapped = dist_utils.wrap_model(model, cfg.parallel, cp_world_size=cfg.cp_world_size) if info.world_size > 1 else model
    forward = torch.compile(wrapped, dynamic=False) if cfg.compile else wrapped
    opt: Optimizers = build_optimizers(raw_model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                       muon_experts=cfg.muon_experts, use_muon=cfg.use_muon)
    autocast = cfg.dtype in ("bfloat16", "bf16") and dev.type == "cuda"

    # --- resume -------------------------------------------------------------------------------------------------
    history: list[dict] = []
    start = 0
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
    last = latest_checkpoint(ckpt_dir) if (ckpt_dir is not None and resume) else None
    if last is not None:
        st = load_checkpoint(last)
        if st["data_seed"] != cfg.seed or st["batch_size"] != cfg.batch_size or st["seq_len"] != data.seq_len:
            raise ValueError(f"checkpoint {str(last)!r} was written with seed/batch/context "
                             f"{st['data_seed']}/{st['batch_size']}/{st['seq_len']}, this run has "
                             f"{cfg.seed}/{cfg.batch_size}/{data.seq_len}; use a fresh ckpt_dir or resume=False")
        dist_utils.load_model_state(raw_model, st["model"])
        opt.load_state_dict(st["optimizer"])
        raw_model.balancer.load_state_dict(st["balancer"])
        _set_rng_state(st["rng"])
        start, history = st["step"], st["history"]
    if metrics_path is not None and info.rank == 0:
        # The log equals the checkpoint's history: lines a killed run wrote after its last checkpoint are dropped.
        atomic_write_text(metrics_path, "".join(json.dumps(h) + "\n" for h in history))

    # --- loop ---------------------------------------------------------------------------------------------------
    K = len(data.categories)
    B = cfg.batch_size
    b = B // dp_size
    mb = cfg.micro_batch_size or b
    T = data.seq_len
    tokens_seen = start * B * T
    t_last, tokens_last = time.perf_counter(), tokens_seen  # throughput since the previous log line
    bar = progress(range(start, cfg.steps), desc=cfg.desc, initial=start, total=cfg.steps,
                   **({"disable": True} if info.rank else {}))
    for step in bar:
        lr_mult = wsd_lr(step, cfg.steps, cfg.warmup_steps, cfg.decay_frac, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_mult
        rows = batch_indices(step, B, len(data), cfg.seed)
        tok = data.tokens_NT1[rows]
        labels = tok[:, 1:].clone()
        if data.loss_mask_NT1 is not None:
            labels[data.loss_mask_NT1[rows][:, 1:] == 0] = -100
        docs = data.doc_ids_NT1[rows] if cfg.doc_mask else None
        if docs is not None:  # as if alone: a document's first token has no target (nothing before it)
            labels[docs[:, 1:] != docs[:, :-1]] = -100
        n_targets = int((labels != -100).sum())  # over the GLOBAL batch: every rank computes the same number
        cats = data.category_NT1[rows][:, 1:]
        mine = slice(dp_rank, None, dp_size)  # this data-parallel rank's rows of the global batch
        inp_l, lab_l, cat_l = tok[mine, :-1], labels[mine], cats[mine]
        doc_l = docs[mine, :-1] if docs is not None else None
        pos = None
        if cp is not None:  # contiguous chunk of every sequence on this context rank
            chunk = T // cfg.cp_world_size
            sl = slice(cp_rank * chunk, (cp_rank + 1) * chunk)
            inp_l, lab_l, cat_l = inp_l[:, sl], lab_l[:, sl], cat_l[:, sl]
            pos = torch.arange(sl.start, sl.stop)[None].expand(inp_l.shape[0], -1).to(dev)
        loss_sum_K = torch.zeros(K, dtype=torch.float64)
        count_K = torch.zeros(K, dtype=torch.float64)
        # Every rank's loss is its token-CE sum over the GLOBAL target count: DDP then averages over dp ranks (hence
        # the factor dp_size); under cp the gradients are summed over all ranks instead (factor 1).
        scale = (dp_size if cp is None else 1.0) / max(n_targets, 1)
        n_micro = (inp_l.shape[0] + mb - 1) // mb
        for m in range(n_micro):
            s = slice(m * mb, (m + 1) * mb)
            x, y, c = inp_l[s].to(dev), lab_l[s].to(dev), cat_l[s]
            with dist_utils.no_sync_unless(wrapped, last=m == n_micro - 1):
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                    tl = _token_losses(forward, x, y, pos[s] if pos is not None else None, cp,
                                       doc_l[s].to(dev) if doc_l is not None else None)
                (tl.sum() * scale).backward()
            with torch.no_grad():
                valid = (y != -100).cpu()
                tlc = tl.detach().double().cpu()
                loss_sum_K.index_add_(0, c[valid], tlc[valid])
                count_K.index_add_(0, c[valid], torch.ones_like(tlc[valid]))
        if cp is not None:  # chunks on different ranks hold partial gradients of the same weights: sum over all ranks
            from .context_parallel import sync_gradients

            sync_gradients(raw_model)
        gnorm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else 1e30)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # Balancing: counts from every rank, then one bias step (identical on all ranks).
        dist_utils.all_reduce_routing_counts(raw_model)
        log_now = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        stats = raw_model.routing_stats() if log_now else None
        if cfg.balance:
            raw_model.update_balancing_biases()
        else:
            raw_model.reset_routing_stats()
        tokens_seen += B * T
        if log_now:
            loss_sum_K, count_K = dist_utils.all_reduce_sum(loss_sum_K), dist_utils.all_reduce_sum(count_K)
            now = time.perf_counter()
            rec = {"step": step + 1, "tokens": tokens_seen,
                   "loss": float(loss_sum_K.sum() / count_K.sum().clamp_min(1)),
                   "loss_per_category": {cat: (float(loss_sum_K[i] / count_K[i]) if count_K[i] > 0 else None)
                                         for i, cat in enumerate(data.categories)},
                   "lr": opt.param_groups[0]["lr"], "grad_norm": float(gnorm),
                   "tokens_per_s": (tokens_seen - tokens_last) / max(now - t_last, 1e-9), "doc_mask": cfg.doc_mask,
                   **_routing_summary(stats)}
            t_last, tokens_last = now, tokens_seen
            history.append(rec)
            if info.rank == 0:
                if metrics_path is not None:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                if hasattr(bar, "set_postfix"):
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                if on_log is not None:
                    on_log(rec)
        if ckpt_dir is not None and (step + 1 == cfg.steps or (cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0)):
            state = {"step": step + 1, "model": dist_utils.full_model_state(raw_model),
                     "optimizer": opt.state_dict(), "balancer": raw_model.balancer.state_dict(),
                     "rng": _rng_state(), "history": history, "data_seed": cfg.seed, "batch_size": B,
                     "seq_len": T, "train_config": asdict(cfg)}
            if info.rank == 0:
                _save_checkpoint(ckpt_dir, step + 1, state, cfg.keep_ckpts)
            dist_utils.barrier()
    if hasattr(bar, "close"):
        bar.close()
    return history
