"""Our ZayaForCausalLM inside the real TRL GRPOTrainer (full fine-tune and peft LoRA), on the debug preset, offline."""
from __future__ import annotations

import pytest
import torch

from _helpers import tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    from zaya_lib.data.tokenizer import train_tokenizer

    texts = [f"what is {a} + {b}? the answer is {a + b}." for a in range(40) for b in range(0, 40, 7)]
    return train_tokenizer(texts, vocab_size=320)


def _grpo(model, tokenizer, tmp_path, peft_config=None, steps=2):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def reward_digits(completions, **kwargs):  # any completion containing a digit earns 1: a signal TRL can use
        return [1.0 if any(ch.isdigit() for ch in c) else 0.0 for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False,
                      report_to="none", save_strategy="no", max_steps=steps, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=8, learning_rate=1e-2, logging_steps=1, seed=0)
    data = Dataset.from_list([{"prompt": f"what is {i} + 1?"} for i in range(8)])
    trainer = GRPOTrainer(model=model, reward_funcs=reward_digits, args=args, train_dataset=data,
                          processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    return trainer


def test_two_grpo_steps_full_finetune(tokenizer, tmp_path):
    model = tiny_model(tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = _grpo(model, tokenizer, tmp_path)
    assert trainer.state.global_step == 2
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    # attention (q/k included, thanks to the key-temperature init) and the experts actually train
    assert any("q_proj" in n for n in changed) and any("experts.gate_up_proj" in n for n in changed)
    assert getattr(model.config, "router_aux_loss_coef", 0.0) in (0, 0.0, None)  # no aux loss sneaks in


def test_two_grpo_steps_with_lora(tokenizer, tmp_path):
    from peft import LoraConfig

    model = tiny_model(tokenizer)
    lora = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj_current", "v_proj_delayed", "o_proj"])
    trainer = _grpo(model, tokenizer, tmp_path, peft_config=lora)
    assert trainer.state.global_step == 2
    peft_model = trainer.model
    lora_b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().max() > 0 for p in lora_b)  # lora_B starts at zero; it moved
    base = [p for n, p in peft_model.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in base)


def test_grpo_rollouts_decode_from_the_cache(tokenizer, tmp_path):
    """TRL's rollouts (GRPOTrainer -> model.generate) prefill once and then feed one token per step. With the cache lost
    (transformers >= 5.24 renamed it, see test_generate_cache.py) every step would re-read the whole prefix."""
    model = tiny_model(tokenizer)
    calls: list[tuple[int, list[int]]] = []  # (prompt length, forward input lengths) per generate() call
    generate, inside = model.generate, []

    def counting_generate(*args, **kwargs):
        calls.append((kwargs["input_ids"].shape[1], []))
        inside.append(True)
        try:
            return generate(*args, **kwargs)
        finally:
            inside.pop()

    def record(module, args, kwargs):
        if inside:  # only the forwards of a rollout, not TRL's log-prob and training forwards
            calls[-1][1].append(int(kwargs["input_ids"].shape[1]))

    model.generate = counting_generate
    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _grpo(model, tokenizer, tmp_path, steps=1)
    finally:
        hook.remove()
    assert calls
    for P, lengths in calls:
        assert lengths[0] == P and len(lengths) >= 2 and set(lengths[1:]) == {1}, (P, lengths)
