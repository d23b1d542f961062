"""TrainConfig.compile: the model under torch.compile (all but the expert GEMM block) computes what eager computes.

Compiling takes ~10-20 s per test on this CPU (debug preset), so these are the only compile tests. fp32 both ways;
inductor reorders and fuses reductions, so values agree to rounding: measured <= 1e-7 relative for the loss and
<= 1e-6 for gradients (worst parameter 9.3e-7); the tolerances leave 10-100x margin and still catch a dropped or doubled term (errors ~1)."""
import torch

from zaya_lib.config import get_config
from zaya_lib.model import ZayaForCausalLM
from zaya_lib.train.trainer import TrainConfig, TrainData, train


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_compiled_forward_backward_matches_eager():
    torch.manual_seed(0)
    eager = ZayaForCausalLM(get_config("debug")).train()
    compiled_model = ZayaForCausalLM(get_config("debug")).train()
    compiled_model.load_state_dict(eager.state_dict())
    fwd = torch.compile(compiled_model, dynamic=False)
    ids = torch.randint(0, eager.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    losses, grads = {}, {}
    for name, m, f in (("eager", eager, eager), ("compiled", compiled_model, fwd)):
        for _ in range(2):   # the second call runs the compiled graph, not the first-call trace
            m.zero_grad(set_to_none=True)
            tl = f(input_ids=ids, targets=targets).token_losses
            loss = tl.sum() / (targets != -100).sum()
            loss.backward()
        losses[name] = loss.detach()
        grads[name] = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert _rel(losses["compiled"], losses["eager"]) < 1e-5
    assert grads["compiled"].keys() == grads["eager"].keys()
    worst = max(grads["eager"], key=lambda n: _rel(grads["compiled"][n], grads["eager"][n]))
    assert _rel(grads["compiled"][worst], grads["eager"][worst]) < 1e-4, worst
    assert any("experts" in n for n in grads["eager"])   # the excluded expert block still gets its gradients


def test_trainer_compile_option_trains_like_eager():
    docs = [[1] + list(range(5 + i % 9, 5 + i % 9 + 20 + i % 5)) + [2] for i in range(40)]
    data = TrainData.from_documents(docs, ["a"] * 40, 16)
    hist = {}
    for comp in (False, True):
        torch.manual_seed(0)
        model = ZayaForCausalLM(get_config("debug"))
        hist[comp] = train(model, data, TrainConfig(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, log_every=1,
                                                    compile=comp))
    # the same first step (same weights and batch); later steps may drift by rounding through top-1 routing
    assert abs(hist[True][0]["loss"] - hist[False][0]["loss"]) < 1e-4 * hist[False][0]["loss"]
    assert all(abs(a["loss"] - b["loss"]) < 0.05 for a, b in zip(hist[True], hist[False]))
