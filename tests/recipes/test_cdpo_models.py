"""cDPO end to end at toy sizes: sampled and verified data, positive and negative LoRA models that
differ from the policy, pairs, and a DPO run that weights rejected tokens by contrastive estimation."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from recipes import dpo
from recipes.cdpo_models import build_cdpo_models, build_pairs, dpo_overrides
from rlhf.config import ModelConfig, TinyModelConfig
from rlhf.loggers import read_metrics
from rlhf.models.load import load_causal_lm, load_tokenizer


def odd_first_character(prompts, completions, **columns):
    """A stand-in verifier that a random model passes about half the time."""
    return [float(bool(c) and ord(c[0]) % 2 == 1) for c in completions]


def test_build_pairs_takes_one_correct_and_one_incorrect_per_prompt():
    rows = [
        {"prompt": "a", "completion": "1", "correct": True, "answer": "1"},
        {"prompt": "a", "completion": "2", "correct": False, "answer": "1"},
        {"prompt": "b", "completion": "3", "correct": True, "answer": "3"},  # no incorrect sample
    ]
    assert build_pairs(rows, seed=0) == [{"prompt": "a", "chosen": "1", "rejected": "2", "answer": "1"}]


def test_cdpo_models_and_weighted_dpo(make_config, tmp_path):
    model_cfg = ModelConfig(
        tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    )
    tokenizer = load_tokenizer(model_cfg)
    policy_dir = str(tmp_path / "policy")
    load_causal_lm(model_cfg, tokenizer, seed=0).save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)

    built = build_cdpo_models(
        policy_dir,
        str(tmp_path / "cdpo"),
        samples=4,
        num_prompts=32,
        reward=f"{__name__}:odd_first_character",
        batch_size=16,
        sft_overrides=("logger=quiet", "optim.lr=1e-2"),
    )
    assert built["num_correct"] > 0 and built["num_incorrect"] > 0 and built["num_pairs"] > 0
    with open(f"{built['pairs']}/train.jsonl") as handle:
        assert {"prompt", "chosen", "rejected", "answer"} <= set(json.loads(handle.readline()))
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).state_dict()
    for name in ("positive_model", "negative_model"):
        model = AutoModelForCausalLM.from_pretrained(built[name]).state_dict()
        changed = [k for k in policy if not torch.equal(policy[k], model[k])]
        assert changed and all("mlp" in k for k in changed), name  # LoRA on the MLP only, merged

    result = dpo.train(
        make_config(
            "dpo",
            *dpo_overrides(policy_dir, built),
            "train.steps=2",
            "train.batch_size=4",
            "train.micro_batch_size=4",
            "eval.every=0",
            "eval.num_samples=4",
        )
    )
    rows = [r for r in read_metrics(result["run_dir"]) if "loss" in r]
    assert all(0.0 < r["cdpo/rejected_weight_mean"] <= 1.0 for r in rows)
