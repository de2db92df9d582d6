"""Shared-prefix forward with sliding-window attention: the packed layout equals the repeated one
(and each row alone) for Mistral and Phi3 (the window passed as an argument), Qwen2 and Qwen3 (some
layers sliding) and Llama (no window), windows shorter than the sequences, GQA, left-padded
prompts, groups of 1, 2 and 5; Gemma2's soft-capping and unknown families are refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from rlhf.models.forward import response_logprobs
from rlhf.models.options import ForwardOptions
from rlhf.models.shared_prefix import check_family, shared_prefix_attention
from tests.unit.test_shared_prefix import TOKENIZER, grouped_batch

WINDOW = 3  # shorter than every prompt + response below
SHAPE = {
    "vocab_size": len(TOKENIZER),
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA
    "max_position_embeddings": 64,
    "pad_token_id": TOKENIZER.pad_token_id,
}
FAMILIES = {
    "llama": lambda: LlamaConfig(**SHAPE),
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=WINDOW),
    "phi3": lambda: Phi3Config(**SHAPE, sliding_window=WINDOW),
    # layer 0 full attention, layer 1 sliding
    "qwen2": lambda: Qwen2Config(
        **SHAPE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
    "qwen3": lambda: Qwen3Config(
        **SHAPE, head_dim=8, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1
    ),
}
PLAIN = ForwardOptions()
# groups of 5, 1 and 2 rows; prompts of 6, 2 and 9 tokens (left-padded to 9); responses up to 7
BATCH = grouped_batch([0, 0, 1, 0, 2, 0, 2, 0], [6, 2, 9], [7, 3, 5, 1, 6, 7, 0, 4], seed=5)


def _model(family: str, attention: str) -> torch.nn.Module:
    config = FAMILIES[family]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention).float()


def _weighted_backward(model, batch=BATCH, options=PLAIN):
    mask = batch[3]
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(1))
    logprobs, _ = response_logprobs(model, *batch, options)
    (logprobs * weights * mask).sum().backward()
    return logprobs, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_windows_are_kept_in_the_packed_layout(family, attention):
    plain = _model(family, attention)
    shared = _model(family, shared_prefix_attention(attention))
    check_family(shared)
    plain_logprobs, plain_grads = _weighted_backward(plain)
    shared_logprobs, shared_grads = _weighted_backward(shared, options=ForwardOptions(shared_prefix=True))
    mask = BATCH[3]
    # fp32: the packed layout adds the same attention terms in another order
    torch.testing.assert_close(shared_logprobs[mask], plain_logprobs[mask], rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # and each row alone (no padding, no group) gives the same log-probs
    for row in (0, 2, 4):
        alone = tuple(t[row : row + 1] for t in BATCH)
        single, _ = response_logprobs(plain, *alone)
        torch.testing.assert_close(
            shared_logprobs[row][mask[row]], single[0][mask[row]], rtol=1e-5, atol=1e-5
        )


def test_the_window_changes_the_numbers_so_the_test_can_see_it():
    """Without its window a Mistral model gives other log-probs: the comparison above is not vacuous."""
    windowed = _model("mistral", "sdpa")
    config = FAMILIES["mistral"]()
    config.sliding_window = None
    torch.manual_seed(0)
    full = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()
    mask = BATCH[3]
    a, _ = response_logprobs(windowed, *BATCH)
    b, _ = response_logprobs(full, *BATCH)
    assert (a[mask] - b[mask]).abs().max() > 1e-3


def test_soft_capping_and_unknown_families_are_refused():
    config = Gemma2Config(**{**SHAPE, "head_dim": 8}, sliding_window=WINDOW)
    gemma = AutoModelForCausalLM.from_config(config, attn_implementation=shared_prefix_attention("eager"))
    with pytest.raises(ValueError, match=r"supports the model families .* not 'gemma2'"):
        check_family(gemma)
    with pytest.raises(ValueError, match="soft-capping"):
        response_logprobs(gemma, *BATCH, ForwardOptions(shared_prefix=True))


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_prefill_once_generation_keeps_the_window(family):
    """The rollout prefills each prompt once and repeats its key/value cache: the same greedy
    tokens and first-step logits as generating every row from scratch."""
    from tests.unit.test_shared_prefix import generate_groups_of_three

    prompt_ids, prompt_mask, _, _ = grouped_batch([0, 1], [7, 4], [0, 0], seed=2)
    plain = _model(family, "sdpa").eval()
    shared = _model(family, shared_prefix_attention("sdpa")).eval()
    plain_out = generate_groups_of_three(plain, prompt_ids, prompt_mask)
    shared_out = generate_groups_of_three(shared, prompt_ids, prompt_mask, shared_prefix=True)
    torch.testing.assert_close(shared_out.logits[0], plain_out.logits[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(shared_out.sequences, plain_out.sequences)


def test_loading_an_untested_family_with_the_shared_prefix_is_a_config_error(tmp_path):
    from rlhf.config import ConfigError, ModelConfig
    from rlhf.models.load import load_causal_lm

    config = Gemma2Config(**{**SHAPE, "head_dim": 8})
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    cfg = ModelConfig(source="pretrained", name_or_path=str(tmp_path), attn_implementation="eager")
    load_causal_lm(cfg, TOKENIZER)  # fine without the shared prefix
    with pytest.raises(ConfigError, match="not 'gemma2'; set model.shared_prefix=false"):
        load_causal_lm(dataclasses.replace(cfg, shared_prefix=True), TOKENIZER)
