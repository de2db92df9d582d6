"""LoRA: the reference is the policy with adapters disabled (no copy), and the export is merged."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM

from recipes import grpo
from rlhf.checkpoint import export_dir
from rlhf.config import LoraConfig, ModelConfig, OptimConfig, TinyModelConfig
from rlhf.distributed.engine import SingleProcessEngine
from rlhf.loggers import read_metrics
from rlhf.models.load import load_policy, load_reference, load_tokenizer
from tests.recipes.test_grpo_smoke import VARIED_REWARD


def _lora_model_config() -> ModelConfig:
    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    return ModelConfig(tiny=tiny, lora=LoraConfig(enabled=True, r=4))


def test_reference_shares_the_policy_weights():
    cfg = _lora_model_config()
    tokenizer = load_tokenizer(cfg)
    engine = SingleProcessEngine(load_policy(cfg, tokenizer), OptimConfig(), 1, torch.device("cpu"))
    reference = load_reference(cfg, tokenizer, engine)
    assert {id(p) for p in reference.parameters()} <= {id(p) for p in engine.module.parameters()}
    trainable = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for name, param in engine.module.named_parameters():
            if "lora_B" in name:
                param.fill_(0.5)  # adapters now change the output...
    ids = torch.tensor([tokenizer("12+34=")["input_ids"]])
    base = load_policy(ModelConfig(tiny=cfg.tiny), tokenizer)  # same seed: the base weights
    torch.testing.assert_close(
        reference(input_ids=ids).logits, base(input_ids=ids).logits
    )  # ...but not the reference
    assert not torch.allclose(engine.model(input_ids=ids).logits, base(input_ids=ids).logits)


def test_grpo_with_lora_and_kl(make_config):
    result = grpo.train(
        make_config(
            "grpo",
            "model.lora.enabled=true",
            "model.lora.r=4",
            "loss.kl_coef=0.1",
            "optim.lr=5e-2",
            "train.prompts_per_step=2",
            "rollout.group_size=4",
            "rollout.max_new_tokens=4",
            "train.micro_batch_size=8",
            "train.steps=3",
            "eval.num_samples=8",
            *VARIED_REWARD,
        )
    )
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    assert rows[0]["kl/mean"] == 0.0  # LoRA starts as the identity, so policy == reference
    assert rows[-1]["kl/mean"] > 0.0
    merged = AutoModelForCausalLM.from_pretrained(export_dir(result["checkpoint"]))
    assert not any("lora" in name for name in merged.state_dict())
    assert os.path.isfile(os.path.join(result["checkpoint"], "adapter", "adapter_model.safetensors"))
