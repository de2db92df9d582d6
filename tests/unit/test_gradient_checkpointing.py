"""Activation checkpointing (model.gradient_checkpointing=true): the same log-probs and every
parameter's gradient as without it, for the policy, a critic, LoRA and the shared-prefix forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rlhf.config import LoraConfig
from rlhf.models.forward import response_logprobs, token_values
from rlhf.models.load import load_policy, load_scorer
from rlhf.models.options import ForwardOptions
from tests.unit.test_shared_prefix import MIXED, TOKENIZER, model_config

PLAIN = ForwardOptions()


def _gradients(
    model, value_head: bool = False, options: ForwardOptions = PLAIN
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    mask = MIXED[3]
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))
    values = (
        token_values(model, *MIXED, options) if value_head else response_logprobs(model, *MIXED, options)[0]
    )
    (values * weights * mask).sum().backward()
    return values, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _counted(forward, calls: dict, key: int):
    def counting(*args, **kwargs):
        calls[key] += 1
        return forward(*args, **kwargs)

    return counting


def _checkpointing(model) -> bool:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (
        inner.is_activation_checkpointing
        if hasattr(inner, "is_activation_checkpointing")
        else inner.is_gradient_checkpointing
    )


@pytest.mark.parametrize(
    "shared_prefix,lora,value_head",
    [(False, False, False), (True, False, False), (False, True, False), (False, False, True)],
)
def test_checkpointed_gradients_equal_the_plain_ones(shared_prefix, lora, value_head):
    plain_cfg = model_config("llama", "sdpa", shared_prefix)
    if lora:
        plain_cfg = dataclasses.replace(plain_cfg, lora=LoraConfig(enabled=True, r=4))
    checkpointed_cfg = dataclasses.replace(plain_cfg, gradient_checkpointing=True)
    load = (
        (lambda cfg: load_scorer(cfg, TOKENIZER, seed=3, per_token=True))
        if value_head
        else (lambda cfg: load_policy(cfg, TOKENIZER, seed=3))
    )
    models = []
    for cfg in (plain_cfg, checkpointed_cfg):
        torch.manual_seed(0)  # LoRA's A matrices are drawn from the global generator
        models.append(load(cfg).train())
    plain, checkpointed = models
    assert _checkpointing(checkpointed) and not _checkpointing(plain)
    calls = {id(plain): 0, id(checkpointed): 0}
    for model in (plain, checkpointed):  # count the first MLP's forwards (torch skips hooks in a recompute)
        mlp = next(m for name, m in model.named_modules() if name.endswith("layers.0.mlp"))
        mlp.forward = _counted(mlp.forward, calls, id(model))
    options = ForwardOptions.from_config(plain_cfg)
    plain_values, plain_grads = _gradients(plain, value_head, options)
    values, grads = _gradients(checkpointed, value_head, options)
    assert (calls[id(plain)], calls[id(checkpointed)]) == (1, 2)  # the layer's MLP ran again in the backward
    torch.testing.assert_close(values, plain_values, rtol=0, atol=0)  # the same forward
    assert plain_grads.keys() == grads.keys() and grads
    for name, grad in plain_grads.items():
        # recomputed activations are bit-identical and the backward sums in the same order
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
