"""Optimizer groups (Muon only on 2-D hidden weights), per-expert Muon, and the warmup-stable-decay schedule."""
import pytest
import torch

from zaya_lib.config import get_config
from zaya_lib.model import ZayaForCausalLM
from zaya_lib.train.optim import ExpertMuon, build_optimizers, newton_schulz_batched, split_params, wsd_lr

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ZayaForCausalLM(get_config("debug"))


def test_muon_gets_only_2d_hidden_weights(model):
    g = split_params(model, muon_experts=True)
    muon = dict(g["muon"])
    assert muon and all(p.ndim == 2 for p in muon.values())
    assert not any("embed_tokens" in n or "lm_head" in n for n in muon)
    # the attention and router matrices are Muon's; norms, biases, convs, temperatures and the embedding are AdamW's
    assert any(n.endswith("q_proj.weight") for n in muon) and any(n.endswith("router_mlp.fc1.weight") for n in muon)
    adamw = dict(g["adamw"])
    assert "model.embed_tokens.weight" in adamw
    assert any("conv_qk_depthwise.weight" in n for n in adamw)  # 3-D conv: not a Muon matrix
    assert all(p.ndim == 3 and ".experts." in n for n, p in g["expert_muon"])
    # every trainable parameter lands in exactly one group (the tied head is the embedding)
    names = [n for grp in g.values() for n, _ in grp]
    assert len(names) == len(set(names)) == len(dict(model.named_parameters()))
    # without per-expert Muon the experts go to AdamW
    g2 = split_params(model, muon_experts=False)
    assert not g2["expert_muon"] and any(".experts." in n for n, _ in g2["adamw"])


def test_optimizers_state_roundtrip_and_live_groups(model):
    opt = build_optimizers(model, lr=1e-3, muon_experts=True)
    assert set(opt.opts) == {"muon", "expert_muon", "adamw"}
    assert isinstance(opt.opts["muon"], torch.optim.Muon) and isinstance(opt.opts["expert_muon"], ExpertMuon)
    for g in opt.param_groups:  # a schedule writing lr through the wrapper reaches every optimizer
        g["lr"] = 0.5
    assert all(g["lr"] == 0.5 for o in opt.opts.values() for g in o.param_groups)
    x = torch.randint(0, 128, (2, 16))
    model(x, labels=x).loss.backward()
    opt.step()
    sd = opt.state_dict()
    opt2 = build_optimizers(model, lr=1e-3, muon_experts=True)
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.opts["muon"].state_dict()["state"][0]["momentum_buffer"],
                       sd["muon"]["state"][0]["momentum_buffer"])
    opt.zero_grad()
    with pytest.raises(ValueError, match="parts"):
        build_optimizers(model, lr=1e-3, muon_experts=False).load_state_dict(sd)


def test_batched_newton_schulz_matches_torch_per_slice():
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.manual_seed(0)
    G = torch.randn(5, 24, 40)
    ref = torch.stack([_zeropower_via_newtonschulz(G[e], (3.4445, -4.775, 2.0315), 5, 1e-7) for e in range(5)]).float()
    got = newton_schulz_batched(G, dtype=torch.bfloat16).float()
    # same bf16 arithmetic, batched matmul instead of addmm: differences are bf16 rounding (eps 2^-8 ~ 4e-3)
    assert torch.allclose(got, ref, atol=2e-2), (got - ref).abs().max()
    got32 = newton_schulz_batched(G, dtype=torch.float32)
    # fp32 lands on the same quasi-orthogonal matrix (singular values ~ 0.7..1.2, the quintic's band) within bf16 noise
    assert torch.allclose(got32, ref, atol=5e-2), (got32 - ref).abs().max()
    s = torch.linalg.svdvals(got32)
    assert float(s.min()) > 0.5 and float(s.max()) < 1.3


def test_expert_muon_equals_torch_muon_on_each_slice():
    torch.manual_seed(0)
    W = torch.randn(4, 12, 8)
    grads = [torch.randn(4, 12, 8) for _ in range(3)]
    p3 = torch.nn.Parameter(W.clone())
    p2 = [torch.nn.Parameter(W[e].clone()) for e in range(4)]
    o3 = ExpertMuon([p3], lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    o2 = torch.optim.Muon(p2, lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    for g in grads:
        p3.grad = g.clone()
        for e in range(4):
            p2[e].grad = g[e].clone()
        o3.step()
        o2.step()
    # our NS runs in fp32 on the CPU, torch's in bf16: the updates differ by bf16 rounding of an O(lr) step
    assert torch.allclose(p3.detach(), torch.stack([p.detach() for p in p2]), atol=2e-3)


def test_wsd_schedule_shape():
    total, warm = 100, 10
    f = [wsd_lr(s, total, warm, decay_frac=0.2, min_ratio=0.1) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    assert all(x == 1.0 for x in f[10:80])  # stable
    assert all(a > b for a, b in zip(f[80:], f[81:]))  # linear decay over the last 20
    assert f[-1] == pytest.approx(0.1)  # ends at min_ratio
    with pytest.raises(ValueError, match="total_steps"):
        wsd_lr(0, 0, 1)
