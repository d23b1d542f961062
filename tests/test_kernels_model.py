"""The whole model with its Triton paths (attn_impl / moe_impl = "triton") against the eager PyTorch path.

Same weights, same tokens: logits and every parameter gradient must agree. Runs on a GPU when CUDA is present, else
in the Triton CPU interpreter. Both sides are fp32 with exact (IEEE) fp32 dots, so they differ only by summation
order: measured ~1e-7 relative for logits and up to 2.2e-5 for the worst single parameter's gradient (CPU
interpreter); the tolerances below leave about 10x margin while still failing on any wrong mask, index or missing
term (those give errors of order 1)."""
import pytest
import torch

from _helpers import DEVICE, random_debug_model  # first: the Triton interpreter without CUDA
from zaya_lib.model import ZayaForCausalLM

LOGIT_RTOL, GRAD_RTOL = 1e-6, 2e-4


def _model(impls: dict, seed: int = 0) -> ZayaForCausalLM:
    return random_debug_model(seed, **impls).to(DEVICE)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("impls", [dict(attn_impl="triton"), dict(moe_impl="triton"),
                                   dict(attn_impl="triton", moe_impl="triton")],
                         ids=["attn", "moe", "both"])
def test_triton_paths_match_eager_logits_and_grads(impls):
    eager, fast = _model({}), _model(impls)
    assert fast.config.attn_impl == impls.get("attn_impl", "eager")
    ids = torch.randint(0, eager.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    w = torch.randn(2, 37, eager.config.vocab_size, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    outs = {}
    for name, m in (("eager", eager), ("triton", fast)):
        logits = m(input_ids=ids).logits
        (logits.float() * w).sum().backward()
        outs[name] = (logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    (le, ge), (lt, gt) = outs["eager"], outs["triton"]
    print(f"logits rel {_rel(lt, le):.2e}, worst grad {max(_rel(gt[n], ge[n]) for n in ge):.2e}")
    assert _rel(lt, le) < LOGIT_RTOL, f"logits differ: rel {_rel(lt, le):.2e}"
    assert ge.keys() == gt.keys()
    worst = max(ge, key=lambda n: _rel(gt[n], ge[n]))
    assert _rel(gt[worst], ge[worst]) < GRAD_RTOL, f"grad {worst} differs: rel {_rel(gt[worst], ge[worst]):.2e}"
    # the comparison has teeth: the q/k conv and expert weights do get gradients on both paths
    assert any("conv" in n for n in ge) and any("experts" in n for n in ge)
