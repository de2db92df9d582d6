"""Mixed precision (train.precision=bf16): bf16 compute, float32 master weights and optimizer state."""

from __future__ import annotations

import pytest
import torch

from rlhf.config import ConfigError, GRPOTrainConfig, OptimConfig
from rlhf.distributed.engine import SingleProcessEngine
from rlhf.models.precision import autocast_forward
from rlhf.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_causal_lm

# Adam's first step moves every weight by about lr, whatever its gradient's size.
SMALL_UPDATE = OptimConfig(lr=1e-4, max_grad_norm=None, scheduler="constant")


def _one_step(model: torch.nn.Module, precision: str) -> torch.Tensor:
    engine = SingleProcessEngine(model, SMALL_UPDATE, 1, torch.device("cpu"), precision=precision)
    before = model.weight.detach().clone()
    engine.backward(engine.model(torch.ones(3, 4, dtype=model.weight.dtype)).float().sum())
    engine.step()
    return model.weight.detach() - before


def test_bf16_mixed_precision_keeps_updates_that_pure_bf16_rounds_away():
    """A weight of 1.0 moved by lr 1e-4: float32 master weights keep the step; bf16 weights (spacing
    2^-7 at 1.0) round it away entirely. This is what the old pretrained default lost."""
    mixed = torch.nn.Linear(4, 2, bias=False)
    torch.nn.init.ones_(mixed.weight)
    step = _one_step(mixed, "bf16")
    assert mixed.weight.dtype == torch.float32
    # Adam's first step is lr * g / (|g| + eps) = 1e-4 to 1e-8 relative; the step is read back as a
    # float32 difference near 1.0, whose spacing (2^-23 ~ 1.2e-7) is 1.2e-3 of 1e-4
    assert torch.allclose(step.abs(), torch.full_like(step, 1e-4), rtol=2e-3)
    pure = torch.nn.Linear(4, 2, bias=False).to(torch.bfloat16)
    torch.nn.init.ones_(pure.weight)
    with pytest.warns(UserWarning, match="pure torch.bfloat16 weights"):
        assert torch.count_nonzero(_one_step(pure, "fp32")) == 0


def test_the_forward_runs_in_bf16_and_the_logits_come_back_float32_for_the_losses():
    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2), tokenizer)
    ids = torch.tensor([[4, 5, 6, 7]])
    reference = model(ids).logits
    autocast_forward(model, "cpu")
    logits = model(ids).logits
    assert logits.dtype == torch.bfloat16  # the LM head ran under autocast
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(logits.float(), reference)
    # bf16 keeps 8 significant bits (relative error 2^-8 ~ 0.004 per rounding); a few roundings through
    # one layer and the head stay well inside 0.05, while a wrong model would be off by order 1
    torch.testing.assert_close(logits.float(), reference, rtol=0.05, atol=0.05)


def test_precision_names_are_checked_when_composed():
    with pytest.raises(ConfigError, match=r"train.precision='fp16' is not one of \['bf16', 'fp32'\]"):
        GRPOTrainConfig(precision="fp16")


def test_a_low_precision_trained_model_warns_with_the_fix():
    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="pure torch.bfloat16 weights .* train.precision=bf16"):
        SingleProcessEngine(model, OptimConfig(), 1, torch.device("cpu"))
