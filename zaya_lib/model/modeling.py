"""ZAYA1 blocks, residual scaling and `ZayaForCausalLM` (a transformers `PreTrainedModel` + `GenerationMixin`).

Block (spec §2):  x = (embed(ids) + b_in) * s_in  (fp32 residual stream)
                  x = RS_attn(CCA(RMSNorm(x)), x);  m, r = MoE(RMSNorm(x), r);  x = RS_mlp(m, x)
                  logits = embed.W @ RMSNorm(x)      (tied head)
with RS(h, res) = (h + hb) * hs + (res + rb) * rs, all per-channel [D] (the code form of [TR] eq. 6).

Notable features:
- State-dict keys and `config.json` match transformers' ZAYA port, so the released checkpoint loads unchanged.
- Left padding: pad tokens are zeroed before the q/k/v projections (no leak through the convs or the value delay),
  positions restart at the first real token, and pad keys are masked; a left-padded row gets the same logits as
  the same sequence alone.
- Document masking (`doc_ids=`): every document of a packed training window computed as if alone (attention, conv
  history, delayed value, positions; `documents.py`); absent, the model behaves as without it.
- Cached decoding through `ZayaCache` (compressed K/V + conv and delayed-value states); prefill followed by token-by-token
  decode reproduces a full forward.
- Training features the reference lacks: the balancing-bias optimizer (`update_balancing_biases`), routing statistics
  (`routing_stats`), a from-scratch initialisation with a justified key temperature, `set_rope_theta` for the
  context-extension phases, and a fused head + cross-entropy (`targets=`, `linear_cross_entropy`) that returns
  per-token losses without the [N, V] log-softmax, zero-filled gradient and scatter of the usual path.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from ..config import ZayaConfig
from .attention import CCAttention, rope_cos_sin
from .cache import ZayaCache
from .documents import DocMask
from .fused_ops import residual_scale
from .moe import BalancingBiasOptimizer, MoEBlock, RMSNorm, Router

__all__ = ["ZayaModel", "ZayaForCausalLM", "ZayaOutput", "ZayaModelOutput", "linear_cross_entropy"]


# The decode cache's name: transformers >= 5.24 calls it `cache` (generate() passes `cache=` to
# prepare_inputs_for_generation and reads `outputs["cache"]`), 5.23 `past_key_values`. We take either name as an input
# and return the cache under both names, so generate() of either line finds it and keeps decoding incrementally.
CACHE_NAME = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
    else "past_key_values"


def _one_cache(cache, past_key_values):
    """The cache passed under either name (both may be given only if they are the same object)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the decode cache as `cache` or as `past_key_values`, not two different ones")
    return cache if cache is not None else past_key_values


@dataclass
class ZayaModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: ZayaCache | None = None  # the same object as `cache` (the name before transformers 5.24)
    cache: ZayaCache | None = None


@dataclass
class ZayaOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: ZayaCache | None = None  # the same object as `cache` (the name before transformers 5.24)
    token_losses: torch.Tensor | None = None  # [B, T] fp32, with `targets=` (the fused path; logits is None then)
    cache: ZayaCache | None = None


class ResidualScaling(nn.Module):
    """(h + hb) * hs + (res + rb) * rs, per channel; init hs = rs = 1, hb = rb = 0 (an ordinary residual)."""

    def __init__(self, D: int):
        super().__init__()
        self.hidden_states_scale = nn.Parameter(torch.ones(D))
        self.hidden_states_bias = nn.Parameter(torch.zeros(D))
        self.residual_scale = nn.Parameter(torch.ones(D))
        self.residual_bias = nn.Parameter(torch.zeros(D))

    def forward(self, h: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        return residual_scale(h, res, self.hidden_states_scale, self.hidden_states_bias, self.residual_scale,
                              self.residual_bias)  # one hand-differentiated node when training (fused_ops)


class ZayaDecoderLayer(nn.Module):
    def __init__(self, config: ZayaConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = CCAttention(config, layer_idx)
        self.post_attention_residual_scale = ResidualScaling(config.hidden_size)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEBlock(config, layer_idx)
        self.post_mlp_residual_scale = ResidualScaling(config.hidden_size)

    def forward(self, x, r_prev, cos, sin, attn_mask, cache, pad_mask, cp=None, doc=None):
        dtype = self.input_layernorm.weight.dtype
        h = self.input_layernorm(x.to(dtype))
        if pad_mask is not None:
            h = h * pad_mask  # zero pad tokens before the CCA projections (convs and value delay see zeros)
        a = self.self_attn(h, cos, sin, attn_mask, cache, cp, doc)
        x = self.post_attention_residual_scale(a.float(), x)
        m, r = self.mlp(self.post_attention_layernorm(x.to(dtype)), r_prev)
        x = self.post_mlp_residual_scale(m.float(), x)
        return x, r


class ZayaPreTrainedModel(PreTrainedModel):
    config_class = ZayaConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["ZayaDecoderLayer"]
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\."]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """From-scratch init. Linear/embedding/expert weights N(0, 0.02); norms and residual scales 1, biases 0;
        EDA gamma 1; balancing biases 0 with the skip slot at -1; convs keep PyTorch's default (fan-in uniform).

        Key temperature: `config.temp_init` (1.0). transformers' port inits it to 0, which multiplies every key by 0:
        all attention logits are 0 and q/k receive exactly zero gradient, so attention can never learn to look
        anywhere. At 1.0 the logits start as sqrt(d) cos(q, k), bounded by sqrt(d) (~5.7 for d = 32).
        """
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # Router MLP layers (marked `fan_in_init`) get std 1/sqrt(fan_in) so the routing logits have O(1)
            # spread across tokens at init. With 0.02 the three small layers shrink the logits to ~1e-4: softmax is
            # uniform to 4 digits, every token ranks the experts alike, and the balancing biases alone decide the
            # routing (all tokens flip together from one expert to the next).
            module.weight.normal_(0.0, module.in_features ** -0.5 if getattr(module, "fan_in_init", False) else std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.Conv1d):
            module.reset_parameters()
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, ResidualScaling):
            module.hidden_states_scale.fill_(1.0)
            module.residual_scale.fill_(1.0)
            module.hidden_states_bias.zero_()
            module.residual_bias.zero_()
        elif isinstance(module, Router):
            if module.use_eda:
                module.router_states_scale.fill_(1.0)
            module.balancing_biases.zero_()
            module.balancing_biases[-1] = -1.0
        elif hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and isinstance(module.down_proj, nn.Parameter):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)
        elif hasattr(module, "temp") and isinstance(module.temp, nn.Parameter):
            module.temp.fill_(float(self.config.temp_init))
        elif isinstance(module, ZayaModel):
            module.input_hidden_states_scale.fill_(1.0)
            module.input_hidden_states_bias.zero_()


class ZayaModel(ZayaPreTrainedModel):
    """The backbone: embeddings, 40 (CCA, MoE) blocks, final norm. Returns `.last_hidden_state` (TRL's fused head uses it)."""

    def __init__(self, config: ZayaConfig):
        super().__init__(config)
        config.validate()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=None)
        self.input_hidden_states_scale = nn.Parameter(torch.ones(config.hidden_size))
        self.input_hidden_states_bias = nn.Parameter(torch.zeros(config.hidden_size))
        self.layers = nn.ModuleList(ZayaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=False, cp=None, doc_ids=None, cache=None, **kwargs) -> ZayaModelOutput:
        """cp: optional context parallelism (`zaya_lib.train.context_parallel.ContextParallel`): this rank's chunk of
        the sequence; pass global `position_ids`. No padding or cache with cp. The decode cache (a `ZayaCache`) comes
        as `cache` (transformers >= 5.24) or `past_key_values` (the older name).
        doc_ids: optional [B, T] document ids of packed windows (a document = a maximal run of equal ids): every
        document is computed as if alone (`documents.DocMask`; positions restart at each document unless
        `position_ids` are given). Training only: no attention_mask, cache or cp with it."""
        cfg = self.config
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= cfg.vocab_size):
                raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); got min {int(input_ids.min())}, "
                                 f"max {int(input_ids.max())} (vocab_size={cfg.vocab_size})")
            inputs_embeds = self.embed_tokens(input_ids)
        B, T, _ = inputs_embeds.shape
        cache = _one_cache(cache, past_key_values)
        if cache is not None and not isinstance(cache, ZayaCache):
            raise TypeError(f"the cache (past_key_values) must be a ZayaCache, got {type(cache).__name__}")
        if use_cache and cache is None:
            cache = ZayaCache(cfg.num_hidden_layers)
        past = cache.seq_len if cache is not None else 0
        dev = inputs_embeds.device

        if attention_mask is not None:
            if attention_mask.ndim != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] != past + T:
                raise ValueError(f"attention_mask must be [batch, past + new] = [{B}, {past + T}], "
                                 f"got {tuple(attention_mask.shape)}")
            am = attention_mask.to(torch.bool)
            if bool(am.all()):
                am = None
        else:
            am = None

        if cp is not None and (am is not None or cache is not None):
            raise ValueError("context parallelism supports neither attention_mask padding nor a decode cache")
        doc = None
        if doc_ids is not None:
            if doc_ids.shape != (B, T):
                raise ValueError(f"doc_ids must be [batch, seq] = [{B}, {T}], got {tuple(doc_ids.shape)}")
            if am is not None or cache is not None or use_cache or cp is not None:
                raise ValueError("doc_ids (document masking of packed windows) excludes attention_mask padding, a "
                                 "decode cache and context parallelism")
            doc = DocMask(doc_ids.to(dev))
        if position_ids is None:
            if doc is not None:
                position_ids = doc.position_ids
            elif cp is not None:
                position_ids = torch.arange(cp.offset(T), cp.offset(T) + T, device=dev)[None].expand(B, T)
            elif am is not None:  # positions restart at each row's first real token (left padding)
                position_ids = (am.long().cumsum(-1) - 1).clamp_min(0)[:, past:]
            else:
                position_ids = torch.arange(past, past + T, device=dev)[None].expand(B, T)
        elif position_ids.ndim == 1:
            position_ids = position_ids[None].expand(B, T)
        cos, sin = rope_cos_sin(position_ids, cfg.rotary_dim, cfg.rope_theta, dtype=inputs_embeds.dtype)

        attn_mask, pad_mask = None, None
        if am is not None:
            S = past + T
            q_pos = torch.arange(past, S, device=dev)[:, None]
            k_pos = torch.arange(S, device=dev)[None, :]
            causal = k_pos <= q_pos  # [T, S]
            attn_mask = causal[None] & am[:, None, :]  # [B, T, S]
            attn_mask = attn_mask | (k_pos == q_pos)[None]  # a pad query attends to itself: no all-masked rows
            attn_mask = attn_mask[:, None]  # [B, 1, T, S]
            pad_mask = am[:, past:, None].to(inputs_embeds.dtype)  # [B, T, 1]
        elif past > 0 and T > 1:  # chunked prefill on top of a cache: causal with an offset
            S = past + T
            attn_mask = (torch.arange(S, device=dev)[None, :] <= torch.arange(past, S, device=dev)[:, None])[None, None]

        x = ((inputs_embeds + self.input_hidden_states_bias) * self.input_hidden_states_scale).float()
        r = None
        for layer in self.layers:
            x, r = layer(x, r, cos, sin, attn_mask, cache, pad_mask, cp, doc)
        h = self.norm(x.to(self.norm.weight.dtype))
        cache = cache if use_cache else None
        return ZayaModelOutput(last_hidden_state=h, past_key_values=cache, cache=cache)

    def routers(self) -> list[Router]:
        return [layer.mlp.gate for layer in self.layers]


class ZayaForCausalLM(ZayaPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ZayaConfig):
        super().__init__(config)
        self.model = ZayaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self._balancer: BalancingBiasOptimizer | None = None
        self.post_init()

    # --- HF plumbing -------------------------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new):
        self.lm_head = new

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own cache (ZayaCache); generate() must not build a DynamicCache

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=True,
                                      position_ids=None, cache=None, **kwargs):
        """generate() hands over the cache as `cache` (transformers >= 5.24) or `past_key_values` (5.23); only the
        tokens it has not seen yet go to the forward (prefill once, then one token per step)."""
        cache = _one_cache(cache, past_key_values)
        if cache is not None and cache.seq_len > 0:
            input_ids = input_ids[:, cache.seq_len:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, CACHE_NAME: cache, "use_cache": use_cache}

    def _reorder_cache(self, past_key_values, beam_idx):
        past_key_values.reorder(beam_idx)
        return past_key_values

    # --- forward -------------------------------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=False, logits_to_keep: int = 0, targets=None,
                cache=None, **kwargs) -> ZayaOutput:
        """HF semantics, plus `targets` [B, T]: next-token ids already aligned with the inputs (-100 = no target);
        the output then carries fp32 per-token losses in `token_losses` from the fused head + cross-entropy, and no
        logits (the project trainer's path; `labels` keep the HF meaning: shifted here, mean loss, logits kept).
        `doc_ids=` [B, T] (keyword): document masking of packed windows, see `ZayaModel.forward`."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         cp=kwargs.get("cp"), doc_ids=kwargs.get("doc_ids"), cache=cache)
        h = out.last_hidden_state
        if targets is not None:
            if labels is not None or logits_to_keep:
                raise ValueError("targets= (fused per-token losses) excludes labels= and logits_to_keep")
            if targets.shape != h.shape[:2]:
                raise ValueError(f"targets {tuple(targets.shape)} must match the inputs {tuple(h.shape[:2])}")
            h_ND, t_N = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
            if self.lm_head.bias is None:
                tl = linear_cross_entropy(h_ND, self.lm_head.weight, t_N)
            else:  # a head bias (config.lm_head_bias): the plain path
                tl = F.cross_entropy(self.lm_head(h_ND).float(), t_N, ignore_index=-100, reduction="none")
            return ZayaOutput(token_losses=tl.view(targets.shape), past_key_values=out.cache, cache=out.cache)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            if kwargs.get("doc_ids") is not None:  # no target across documents: a document's first token has none
                labels = labels.masked_fill(~DocMask(kwargs["doc_ids"]).cont.to(labels.device), -100)
            loss = causal_lm_loss(logits, labels, kwargs.get("num_items_in_batch"))
        return ZayaOutput(loss=loss, logits=logits, past_key_values=out.cache, cache=out.cache)

    # --- training features ----------------------------------------------------------------------------------------------
    def routers(self) -> list[Router]:
        return self.model.routers()

    @property
    def balancer(self) -> BalancingBiasOptimizer:
        if self._balancer is None:
            self._balancer = BalancingBiasOptimizer(self.routers(), lr=self.config.balance_lr)
        return self._balancer

    @torch.no_grad()
    def update_balancing_biases(self, reset_stats: bool = True) -> None:
        """One aux-loss-free balancing step from the counts accumulated in training-mode forwards since the last call."""
        self.balancer.step()
        if reset_stats:
            self.reset_routing_stats()

    def reset_routing_stats(self) -> None:
        for r in self.routers():
            r.reset_stats()

    def routing_stats(self) -> list[dict]:
        """Per layer: load fraction per expert, max/mean load, active experts, router entropy (since the last reset)."""
        return [r.stats() for r in self.routers()]

    def set_rope_theta(self, theta: float) -> None:
        """Switch the RoPE base (context extension: 1e4 -> 1e6 -> 5e6 in the paper). cos/sin are computed per forward."""
        self.config.rope_theta = float(theta)


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of `h @ W.T` in fp32, computed in blocks of rows, with the logits held transposed.

    Forward, per block of rows b: logits^T = W @ h_b^T ([V, b]; BLAS runs this orientation ~10% faster here than
    h_b @ W^T), then max-shifted exp, sum and normalisation down the columns in the logits' own buffer (one exp pass;
    the loss is max + log(sum) - logit[target]; no log-softmax kept). Backward, per block: dlogits^T = (p - onehot) * g
    in place, dh_b = dlogits^T.T @ W into its rows of dh, dW (+)= dlogits^T @ h_b (the first block writes, the rest
    accumulate). Blocks of ~4 MB (`_ce_block_rows`) keep each block's element-wise passes in cache right before the
    GEMM that consumes it, and no [N, V] array is ever allocated: a single one (32 MB at 2048 x 4096) exceeds glibc's
    mmap threshold, so each step would page-fault it in fresh. The usual path allocates logits, log-softmax, a
    zero-filled [N, V] gradient and its scatter, each in full."""

    @staticmethod
    def forward(ctx, h_ND, W_VD, target_N, ignore_index):
        ct = torch.promote_types(h_ND.dtype, torch.float32)  # fp32 at least (float64 stays float64)
        h, W = h_ND.to(ct), W_VD.to(ct)
        N, V = h.shape[0], W.shape[0]
        valid_N = target_N != ignore_index
        safe_N = torch.where(valid_N, target_N, 0)
        loss_N = h.new_empty(N)
        rows = _ce_block_rows(V)
        blocks = []
        for s in range(0, N, rows):
            e = min(N, s + rows)
            cols = torch.arange(e - s, device=h.device)
            logits_t = torch.mm(W, h[s:e].t())  # [V, b]
            picked = logits_t[safe_N[s:e], cols]
            m = logits_t.amax(dim=0)
            p = logits_t.sub_(m).exp_()  # in place, one exp pass (logsumexp would take its own)
            z = p.sum(dim=0)
            torch.sub(m + z.log(), picked, out=loss_N[s:e])  # lse - logit[target]
            blocks.append(p.div_(z))  # softmax probabilities, [V, b]
        loss_N.masked_fill_(~valid_N, 0.0)
        ctx.save_for_backward(h_ND, W_VD, safe_N, valid_N)
        ctx.blocks, ctx.rows = blocks, rows
        return loss_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_N):
        if ctx.blocks is None:
            raise RuntimeError("linear_cross_entropy: backward ran twice (retain_graph) but its buffers are reused in place")
        blocks, ctx.blocks = ctx.blocks, None
        h_ND, W_VD, safe_N, valid_N = ctx.saved_tensors
        ct = blocks[0].dtype if blocks else torch.promote_types(h_ND.dtype, torch.float32)
        h, W = h_ND.to(ct), W_VD.to(ct)
        g_N = torch.where(valid_N, grad_N.to(ct), 0.0)
        need_h, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_h else None
        dW = (torch.empty_like(W) if blocks else torch.zeros_like(W)) if need_W else None
        for i, d in enumerate(blocks):  # d: [V, b]
            s = i * ctx.rows
            e = s + d.shape[1]
            d[safe_N[s:e], torch.arange(e - s, device=d.device)] -= 1.0
            d.mul_(g_N[s:e])
            if need_h:
                torch.mm(d.t(), W, out=dh[s:e])
            if need_W and i == 0:
                torch.mm(d, h[s:e], out=dW)  # the first block writes, the rest accumulate (no zero fill)
            elif need_W:
                dW.addmm_(d, h[s:e])
        return (dh.to(h_ND.dtype) if need_h else None), (dW.to(W_VD.dtype) if need_W else None), None, None


def _ce_block_rows(V: int, block_bytes: int = 4 << 20) -> int:
    """Rows per cross-entropy block: ~4 MB of fp32 logits (256 rows at V = 4096), at least 16 rows (large vocabs)."""
    return max(16, block_bytes // (4 * V))


def linear_cross_entropy(h_ND: torch.Tensor, W_VD: torch.Tensor, target_N: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """fp32 per-token losses [N] of the head `h @ W.T` against `target_N` (0 where ignored), fused (see above);
    equal to `F.cross_entropy(h @ W.T, target, reduction="none")` within fp32 rounding."""
    return _LinearCrossEntropy.apply(h_ND, W_VD, target_N, ignore_index)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Next-token cross entropy in fp32; labels are shifted here and -100 is ignored (HF convention)."""
    V = logits.shape[-1]
    # Shift the labels, not the logits: slicing logits[:, :-1] would copy the largest activation of the step.
    target = F.pad(labels[:, 1:].to(logits.device), (0, 1), value=-100).reshape(-1)
    logits = logits.reshape(-1, V).float()
    if num_items_in_batch is not None:
        return F.cross_entropy(logits, target, ignore_index=-100, reduction="sum") / num_items_in_batch
    return F.cross_entropy(logits, target, ignore_index=-100)
