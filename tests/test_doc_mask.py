"""Document masking (`doc_ids`): a packed window computes exactly what its documents compute one by one.

Two windows of 36 tokens hold 4 and 3 documents of different lengths (the second ends in a padding run, which is
a document of its own, as `pack_sft` marks it with -1). The packed forward with `doc_ids` is compared with each
document run alone: the logits, and the gradients of the mean next-token loss (no target crosses a document) with
respect to every parameter, on every attention path: eager without autograd (SDPA with the block-diagonal causal
mask), the CPU block attention (small blocks, so tiles are skipped and masked), SDPA with autograd (the block path
refused), `torch.compile`, and the Triton kernels in the interpreter. float64 must agree to 1e-10 and float32 to
1e-5 (max abs difference; measured below 1e-14 and 1e-6: only the summation order differs).
"""
import pytest
import torch

from _helpers import random_debug_model  # first: the Triton interpreter without CUDA
from zaya_lib.model import ZayaForCausalLM
from zaya_lib.model import attention as A
from zaya_lib.model import modeling
from zaya_lib.model.documents import DocMask

LENS = [[5, 17, 3, 11], [23, 9, 4]]  # two windows of 36 tokens; the last run of row 2 plays the padding (-1)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _model(dtype, **cfg) -> ZayaForCausalLM:
    return random_debug_model(0, **cfg).to(dtype)


def _window():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 36), generator=g)
    doc_ids = torch.stack([torch.cat([torch.full((n,), i if (b, i) != (1, 2) else -1) for i, n in enumerate(row)])
                           for b, row in enumerate(LENS)])
    return ids, doc_ids


def _targets(ids_BT, doc_BT=None):
    """Next token within the same document, -100 at each document's last token."""
    t = torch.nn.functional.pad(ids_BT[:, 1:], (0, 1), value=-100)
    if doc_BT is not None:
        t[:, :-1][doc_BT[:, 1:] != doc_BT[:, :-1]] = -100
    return t


def _docs(ids):
    out, s = [], 0
    for b, row in enumerate(LENS):
        s = 0
        for n in row:
            out.append(ids[b:b + 1, s:s + n])
            s += n
    return out


def _packed(m, fwd, ids, doc_ids, grad=True):
    """(logits [2, 36, V], {param: grad of the mean loss}) of the packed windows."""
    m.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grad):
        logits = fwd(input_ids=ids, doc_ids=doc_ids).logits
    if not grad:
        return logits, None
    t = _targets(ids, doc_ids)
    tl = fwd(input_ids=ids, targets=t, doc_ids=doc_ids).token_losses
    (tl.sum() / (t != -100).sum()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _alone(m, ids, grad=True):
    """The same, each document run on its own (logits concatenated back into the windows' layout)."""
    m.zero_grad(set_to_none=True)
    docs = _docs(ids)
    with torch.set_grad_enabled(grad):
        parts = [m(input_ids=d).logits for d in docs]
    logits = torch.cat([torch.cat(parts[:len(LENS[0])], 1), torch.cat(parts[len(LENS[0]):], 1)], 0).detach()
    if not grad:
        return logits, None
    n = sum(d.shape[1] - 1 for d in docs)
    loss = sum(m(input_ids=d, targets=_targets(d)).token_losses.sum() for d in docs) / n
    loss.backward()
    return logits, {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}


def _compare(path, dtype, packed, alone):
    (lp, gp), (la, ga) = packed, alone
    dl = (lp - la).abs().max().item()
    dg = max((gp[n] - ga[n]).abs().max().item() for n in ga) if ga is not None else float("nan")
    print(f"{path} {str(dtype)[6:]}: logits max abs diff {dl:.2e}, loss gradients max abs diff {dg:.2e}")
    assert dl < TOL[dtype], f"{path}: logits differ by {dl:.2e}"
    if ga is not None:
        assert gp.keys() == ga.keys()
        assert dg < TOL[dtype], f"{path}: gradients differ by {dg:.2e}"
        assert any("conv_qk_grouped" in n for n in ga) and any("experts" in n for n in ga)
    return dl, dg


def _unmasked_differs(m, ids, la):
    """The comparison has teeth: without doc_ids the same windows give other logits."""
    with torch.no_grad():
        assert (m(input_ids=ids).logits - la).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_eager_sdpa_path_without_autograd(dtype):
    m = _model(dtype)
    ids, doc_ids = _window()
    alone = _alone(m, ids, grad=False)
    _compare("eager (no autograd, SDPA + mask)", dtype, _packed(m, m, ids, doc_ids, grad=False), alone)
    _unmasked_differs(m, ids, alone[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_block_attention_path(dtype, monkeypatch):
    """CPU training path: 8-row blocks, so the later blocks skip the keys of earlier documents."""
    monkeypatch.setattr(A, "BLOCK_ROWS", 8)
    m = _model(dtype)
    ids, doc_ids = _window()
    lows = A.block_key_starts(DocMask(doc_ids).start)
    assert lows == [0, 0, 0, 22, 25]  # rows 24 and 32: documents from 22 (row 0) / 23 (row 1), 25 / 32
    used = []
    orig = A._BlockCausalAttention.apply
    monkeypatch.setattr(A._BlockCausalAttention, "apply", lambda *a: used.append(a[-1]) or orig(*a))
    packed = _packed(m, m, ids, doc_ids)
    assert used and all(lo == lows for lo in used)
    _compare("block attention", dtype, packed, _alone(m, ids))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_sdpa_path_with_autograd(dtype, monkeypatch):
    """The block path refused (its probabilities over budget): SDPA with the mask, under autograd."""
    monkeypatch.setattr(A, "BLOCK_ATTN_MAX_BYTES", 0)
    monkeypatch.setattr(A._BlockCausalAttention, "apply", lambda *a: pytest.fail("block path taken"))
    m = _model(dtype)
    ids, doc_ids = _window()
    _compare("SDPA + mask (autograd)", dtype, _packed(m, m, ids, doc_ids), _alone(m, ids))


def _alone_compiled(m, fwd, ids):
    """Each document alone through the compiled model: one row per document, the document first and unrelated
    tokens after it (causal attention keeps them out of its logits and, with no targets there, out of its loss), one
    batch of one shape, so one compile, and WITHOUT doc_ids (the plain causal graph)."""
    docs = _docs(ids)
    rows = torch.randint(0, 128, (len(docs), 36), generator=torch.Generator().manual_seed(5))
    targets = torch.full_like(rows, -100)
    for i, d in enumerate(docs):
        rows[i, :d.shape[1]] = d[0]
        targets[i, :d.shape[1]] = _targets(d)[0]
    m.zero_grad(set_to_none=True)
    with torch.no_grad():
        full = fwd(input_ids=rows).logits
    parts = [full[i:i + 1, :d.shape[1]] for i, d in enumerate(docs)]
    logits = torch.cat([torch.cat(parts[:len(LENS[0])], 1), torch.cat(parts[len(LENS[0]):], 1)], 0)
    tl = fwd(input_ids=rows, targets=targets).token_losses
    (tl.sum() / (targets != -100).sum()).backward()
    return logits, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_compiled_path(dtype):
    """torch.compile(dynamic=False), as TrainConfig.compile: the document-aware attention and the conv restart run
    eagerly inside the compiled graph (graph breaks), everything else compiled. Compared with the documents alone
    through the compiled model too: the router's fp32 softmax rounds differently compiled than eager (~4e-9 in a
    float64 model, with or without document masking), which is no packing error."""
    torch._dynamo.reset()  # earlier compiles of the same forward (other tests) must not use up the recompile limit,
    # past which dynamo silently runs the new shapes eagerly
    m = _model(dtype)
    ids, doc_ids = _window()
    fwd = torch.compile(m, dynamic=False)
    _compare("compiled", dtype, _packed(m, fwd, ids, doc_ids), _alone_compiled(m, fwd, ids))


def test_triton_path_in_interpreter():
    """attn_impl="triton": the fused q/k kernel with doc_pos and the latent attention with doc_start (fp32 only)."""
    m = _model(torch.float32, attn_impl="triton")
    ids, doc_ids = _window()
    _compare("triton", torch.float32, _packed(m, m, ids, doc_ids), _alone(m, ids))


def test_positions_restart_at_every_document(monkeypatch):
    """RoPE sees each document from position 0 (attention scores depend only on relative positions, so the
    equality tests above cannot see this)."""
    seen = []
    orig = modeling.rope_cos_sin
    monkeypatch.setattr(modeling, "rope_cos_sin", lambda pos, *a, **k: seen.append(pos) or orig(pos, *a, **k))
    m = _model(torch.float32)
    ids, doc_ids = _window()
    with torch.no_grad():
        m(input_ids=ids, doc_ids=doc_ids)
    want = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENS])
    assert torch.equal(seen[-1], want)
    assert torch.equal(DocMask(doc_ids).position_ids, want)


def test_doc_mask_structure():
    ids, doc_ids = _window()
    dm = DocMask(doc_ids)
    for b, row in enumerate(LENS):
        starts = torch.cat([torch.full((n,), s) for n, s in zip(row, torch.tensor([0] + row).cumsum(0).tolist())])
        assert torch.equal(dm.start[b], starts)
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(36, 36, dtype=torch.bool).tril()
    assert torch.equal(dm.attn_mask()[:, 0], same & causal)
    # a document is a maximal run: the same id reappearing later is another document
    assert DocMask(torch.tensor([[3, 3, 4, 3, 3]])).start.tolist() == [[0, 0, 2, 3, 3]]


def test_labels_path_drops_cross_document_targets():
    m = _model(torch.float64)
    ids, doc_ids = _window()
    with torch.no_grad():
        loss = m(input_ids=ids, labels=ids, doc_ids=doc_ids).loss
        docs = _docs(ids)
        n = sum(d.shape[1] - 1 for d in docs)
        want = sum(m(input_ids=d, targets=_targets(d)).token_losses.sum() for d in docs) / n
    assert abs(loss.item() - want.item()) < 1e-6  # the labels path takes its cross entropy in fp32


def test_doc_ids_errors():
    m = _model(torch.float32)
    ids, doc_ids = _window()
    with pytest.raises(ValueError, match="doc_ids must be"):
        m(input_ids=ids, doc_ids=doc_ids[:, :5])
    with pytest.raises(ValueError, match="excludes attention_mask"):
        m(input_ids=ids, doc_ids=doc_ids, attention_mask=torch.ones(2, 36).index_fill_(1, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match="excludes attention_mask"):
        m(input_ids=ids, doc_ids=doc_ids, use_cache=True)


# ---------------------------------------------------------------------------------------------------------------------
# the trainer's option


def test_trainer_doc_mask_first_loss_equals_documents_alone():
    """TrainConfig.doc_mask on pretraining windows (documents cut into windows of T + 1 with stride T): the first
    logged loss (before any update) equals the mean next-token loss of every window's documents computed alone,
    with no target across a document boundary; the option is recorded in every metrics record."""
    from zaya_lib.train.trainer import TrainConfig, TrainData, train

    g = torch.Generator().manual_seed(3)
    docs = [[1] + torch.randint(3, 128, (int(n),), generator=g).tolist() + [2] for n in (4, 11, 2, 7, 15, 5, 9, 3)]
    data = TrainData.from_documents(docs, ["a"] * len(docs), 16)
    assert data.doc_ids_NT1 is not None and data.doc_ids_NT1.shape == data.tokens_NT1.shape
    m = _model(torch.float64)
    with torch.no_grad():
        total, count = 0.0, 0
        for w in range(len(data)):
            tok, dids = data.tokens_NT1[w], data.doc_ids_NT1[w]
            for d in dids.unique():
                seg = tok[dids == d]
                if len(seg) > 1:
                    total += m(input_ids=seg[None, :-1], targets=seg[None, 1:]).token_losses.sum().item()
                    count += len(seg) - 1
    hist = train(m, data, TrainConfig(steps=1, batch_size=len(data), lr=1e-3, warmup_steps=0, log_every=1,
                                      doc_mask=True))
    assert hist[0]["doc_mask"] is True
    assert abs(hist[0]["loss"] - total / count) < 1e-10


def test_trainer_doc_mask_errors():
    from zaya_lib.train.trainer import TrainConfig, TrainData, train

    data = TrainData(torch.randint(0, 128, (4, 9)), torch.zeros(4, 9, dtype=torch.long), ["a"])
    with pytest.raises(ValueError, match="doc_mask needs the documents"):
        train(_model(torch.float32), data, TrainConfig(steps=1, batch_size=2, doc_mask=True))
    with pytest.raises(ValueError, match="context parallelism"):
        TrainConfig(steps=1, batch_size=2, doc_mask=True, cp_world_size=2).validate(8, 2)
    with pytest.raises(ValueError, match="doc_ids_NT1"):
        TrainData(data.tokens_NT1, data.category_NT1, ["a"], doc_ids_NT1=torch.zeros(4, 8, dtype=torch.long))


def test_sft_packing_hands_the_documents_to_the_trainer():
    from zaya_lib.train.sft import pack_sft_data

    g = torch.Generator().manual_seed(4)
    samples = [([1] + torch.randint(3, 100, (n - 1,), generator=g).tolist(), [0] * 2 + [1] * (n - 2))
               for n in (7, 12, 5, 9, 3)]
    data, packed = pack_sft_data({"reasoning": samples[:3], "instruct": samples[3:]}, 19)
    assert torch.equal(data.doc_ids_NT1, packed.doc_ids)
    for w, spans in enumerate(packed.boundaries):
        for slot, (s, e, _) in enumerate(spans):
            assert (data.doc_ids_NT1[w, s:e] == slot).all()
