"""Top-1 MoE expert kernels vs the per-expert loop reference: forward, dx/dgate/dW, skipped tokens, errors.

Runs on a GPU when CUDA is present, else in the Triton CPU interpreter (`_helpers` sets it up before the kernels are
imported)."""
import pytest
import torch

from _helpers import DEVICE, HALF  # first: the Triton interpreter without CUDA
from zaya_kernels import moe_experts, moe_experts_ref
from zaya_kernels.testing import assert_close, assert_half_close

# fp32: identical products summed in another order (fp32 accumulation); measured ~2e-7 rel-RMSE, 1e-4 is generous.
# atol 1e-6: grads of experts that got no token are exactly 0 in both.
RATIO32, ATOL32 = 1e-4, 1e-6

CASES = [  # (N, D, F, E, routing)
    (50, 32, 48, 4, "random"),      # odd F, some skipped tokens (-1)
    (1, 32, 32, 16, "random"),      # a single token
    (200, 64, 32, 16, "random"),
    (63, 48, 40, 8, "one-expert"),  # odd N/D/F; all tokens on one expert, most experts empty
    (17, 16, 16, 4, "all-skipped"),
]
IDS = ["N{}-D{}-F{}-E{}-{}".format(*c) for c in CASES]


def make_inputs(N, D, F, E, routing, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if routing == "random":
        idx = torch.randint(-1, E, (N,), generator=g)
    elif routing == "one-expert":
        idx = torch.full((N,), E - 2)
    else:
        idx = torch.full((N,), -1)
    return dict(x=torch.randn(N, D, generator=g).to(DEVICE, dtype), expert_idx=idx.to(DEVICE),
                gate=torch.rand(N, generator=g).to(DEVICE, dtype),
                gate_up_proj=(torch.randn(E, 2 * F, D, generator=g) * D ** -0.5).to(DEVICE, dtype),
                down_proj=(torch.randn(E, D, F, generator=g) * F ** -0.5).to(DEVICE, dtype))


DIFF = ("x", "gate", "gate_up_proj", "down_proj")


def run(fn, inputs, dy):
    leaves = {k: (v.detach().clone().requires_grad_() if k in DIFF else v) for k, v in inputs.items()}
    y = fn(**leaves)
    if not y.requires_grad:  # the loop reference with every token skipped returns a constant zero tensor
        return y, {k: torch.zeros_like(leaves[k]) for k in DIFF}
    (y.float() * dy).sum().backward()
    return y, {k: leaves[k].grad for k in DIFF}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_moe_fp32(case):
    inputs = make_inputs(*case, torch.float32)
    dy = torch.randn(inputs["x"].shape, device=DEVICE)
    y, grads = run(moe_experts, inputs, dy)
    y_ref, grads_ref = run(moe_experts_ref, inputs, dy)
    assert_close("y", y_ref, y, RATIO32, ATOL32)
    skipped = inputs["expert_idx"] < 0
    assert (y[skipped] == 0).all() and (grads["x"][skipped] == 0).all() and (grads["gate"][skipped] == 0).all()
    for name in DIFF:
        assert_close(f"d{name}", grads_ref[name], grads[name], RATIO32, ATOL32)


@pytest.mark.parametrize("dtype", HALF, ids=[str(d)[6:] for d in HALF])
@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_moe_half(case, dtype):
    inputs = make_inputs(*case, dtype)
    dy = torch.randn(inputs["x"].shape, device=DEVICE)
    y, grads = run(moe_experts, inputs, dy)
    y_h, grads_h = run(moe_experts_ref, inputs, dy)
    in32 = {k: (v.float() if k in DIFF else v) for k, v in inputs.items()}
    y32, grads32 = run(moe_experts_ref, in32, dy)
    ulp = torch.finfo(dtype).eps   # atol: a few ulps at the largest magnitude (each output is rounded to dtype once)
    assert_half_close("y", y32, y_h.float(), y.float(), 4 * ulp * y32.abs().max().item())
    for name in DIFF:
        scale = grads32[name].abs().max().item()
        if name == "gate":  # dgate_n = dy_n . o_n cancels: its rounding error scales with sum |dy_n o_n|, not with |dgate|
            o32 = moe_experts_ref(**{**in32, "gate": torch.ones_like(in32["gate"])})
            scale = (dy.abs() * o32.abs()).sum(-1).max().item()
        assert_half_close(f"d{name}", grads32[name], grads_h[name].float(), grads[name].float(), 4 * ulp * scale + 1e-6)


def test_moe_no_grad_path_matches():
    """Inference (no autograd) takes the path that saves nothing; same numbers."""
    inputs = make_inputs(40, 32, 32, 4, "random", torch.float32, seed=2)
    with torch.no_grad():
        y = moe_experts(**inputs)
    assert_close("y", moe_experts_ref(**inputs), y, RATIO32, ATOL32)


def test_moe_fp32_weights_with_half_activations():
    """Autocast-style call: fp16 tokens with fp32 master weights; the weight grads come back in fp32."""
    inputs = make_inputs(40, 32, 32, 4, "random", torch.float32, seed=3)
    inputs["x"] = inputs["x"].half()
    dy = torch.randn(inputs["x"].shape, device=DEVICE)
    y, grads = run(moe_experts, inputs, dy)
    y32, grads32 = run(moe_experts_ref, {**inputs, "x": inputs["x"].float()}, dy)
    assert y.dtype == torch.float16 and grads["down_proj"].dtype == torch.float32
    # fp16 rounding of x, h and y only: 1e-2 rel-RMSE is ~10x the fp16 unit roundoff times a few roundings
    assert_close("y", y32, y.float(), 1e-2)
    for name in DIFF:
        assert_close(f"d{name}", grads32[name], grads[name].float(), 1e-2)


def test_moe_rejects_bad_inputs():
    inp = make_inputs(8, 16, 16, 4, "random", torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        moe_experts(**{**inp, "x": inp["x"].double()})
    with pytest.raises(ValueError, match=r"x must be \[N, D\]"):
        moe_experts(**{**inp, "x": inp["x"][None]})
    with pytest.raises(ValueError, match="down_proj"):
        moe_experts(**{**inp, "down_proj": inp["down_proj"][:, :, :8]})
    with pytest.raises(ValueError, match="down_proj has dtype"):
        moe_experts(**{**inp, "down_proj": inp["down_proj"].double()})
    with pytest.raises(ValueError, match="expert_idx has dtype"):
        moe_experts(**{**inp, "expert_idx": inp["expert_idx"].int()})
    with pytest.raises(ValueError, match="gate has shape"):
        moe_experts(**{**inp, "gate": inp["gate"][:3]})
    with pytest.raises(ValueError, match="gate_up_proj"):
        moe_experts(**{**inp, "gate_up_proj": inp["gate_up_proj"][:, :31]})


@pytest.mark.parametrize("N,E,BM,kind", [(1, 16, 16, "random"), (200, 16, 16, "random"), (37, 4, 16, "all-skipped"),
                                         (300, 8, 64, "one-expert"), (1500, 16, 64, "random")],
                         ids=lambda v: str(v))
def test_route_map_matches_a_torch_reference(N, E, BM, kind):
    """The one-program routing kernel (offsets and row-tile map) against the same map built with torch ops."""
    import importlib

    M = importlib.import_module("zaya_kernels.moe_experts.moe_experts")
    g = torch.Generator().manual_seed(N)
    idx = {"random": torch.randint(-1, E, (N,), generator=g), "all-skipped": torch.full((N,), -1),
           "one-expert": torch.full((N,), E - 1)}[kind].to(DEVICE)
    order, offsets, tile_expert, tile_row, max_tiles = M._route(idx, E, BM)
    key = torch.where(idx >= 0, idx, E).cpu()
    ref_order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=E + 1)[:E]
    ref_off = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    tiles = (counts + BM - 1) // BM
    ref_exp, ref_row = [], []
    for e in range(E):
        for j in range(int(tiles[e])):
            ref_exp.append(e)
            ref_row.append(int(ref_off[e]) + j * BM)
    assert max_tiles == -(-N // BM) + E
    assert torch.equal(order.cpu(), ref_order)
    assert torch.equal(offsets.cpu().long(), ref_off)
    n = len(ref_exp)
    assert tile_expert[:n].cpu().tolist() == ref_exp and tile_row[:n].cpu().tolist() == ref_row
    assert (tile_expert[n:] == E).all()          # surplus tiles are marked for the GEMMs to skip
