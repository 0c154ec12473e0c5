"""Tiny seeds and PEFT-made adapters for the adapter tests (tests/test_adapters.py, tests/test_adapter_mix.py)."""

from __future__ import annotations

from pathlib import Path

import peft
import torch
import transformers

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR, task_type="CAUSAL_LM"),
    "lora-qv-rslora": lambda: peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                              use_rslora=True, task_type="CAUSAL_LM"),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                  task_type="CAUSAL_LM"),
    "ia3-qv": lambda: peft.IA3Config(target_modules=["q_proj", "v_proj", "down_proj"],
                                     feedforward_modules=["down_proj"], task_type="CAUSAL_LM"),
}


def make_seed(out: Path, seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A tiny random Llama (every parameter perturbed), saved: tests/test_hf_import.py's make_hf_model."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SHAPE, **overrides})).float().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(out)
    return model


def peft_logits(seed_dir: Path, adapter_dir: Path, input_ids: torch.Tensor,
                model_cls=transformers.LlamaForCausalLM) -> torch.Tensor:
    base = model_cls.from_pretrained(seed_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids).logits


def bam_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def input_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(1))


def make_peft_adapter(seed_dir: Path, out: Path, kind: str, model_cls=transformers.LlamaForCausalLM,
                      weights_seed: int = 2) -> None:
    """An adapter made by PEFT on the transformers seed, every tensor random and nonzero."""
    base = model_cls.from_pretrained(seed_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, PEFT_CONFIGS[kind]())
    torch.manual_seed(weights_seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "ia3_l" in name:
                param.copy_((1.0 if "ia3_l" in name else 0.0) + torch.randn_like(param) * 0.3)
    model.save_pretrained(out)
