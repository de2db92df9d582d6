"""AlignDistil's token loss (rlhf/losses/distill.py): hand-computed teachers and KL, gradients, and
the chunked multi-model computation against the plain one on tiny models."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch

from rlhf.losses.distill import (
    aligndistil_teacher,
    distill_token_loss,
    get_distill_teacher,
    reverse_kl,
    theorem1_teacher,
)
from rlhf.models.forward import chunked_token_loss, response_head_inputs, response_logits
from rlhf.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_causal_lm


def test_reverse_kl_hand_computed():
    student = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    teacher = torch.log(torch.tensor([0.25, 0.25, 0.5]))
    expected = 0.5 * math.log(2) + 0.25 * 0 + 0.25 * math.log(0.5)
    assert reverse_kl(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_aligndistil_teacher_extrapolates_by_the_tvd_weight():
    dpo = torch.log(torch.tensor([0.5, 0.5]))
    reverse = torch.log(torch.tensor([0.25, 0.75]))
    teacher, scale = aligndistil_teacher(dpo, reverse, beta=0.1, beta2=10.0)
    w = 10.0 * (0.25 + 0.25) + 1e-3  # TVD = |0.5 - 0.25| + |0.5 - 0.75| (not halved)
    torch.testing.assert_close(teacher, dpo + w * (dpo - reverse))
    assert scale.item() == pytest.approx(0.1 / w)


def test_theorem1_teacher_interpolates_with_fixed_weight():
    dpo, ref = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    teacher, scale = theorem1_teacher(dpo, ref, beta=0.1, beta2=10.0)
    torch.testing.assert_close(teacher, 0.01 * dpo + 0.99 * ref)
    assert scale.item() == 10.0


def test_token_loss_value_gradient_and_vocab_cut():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 5, generator=generator, requires_grad=True)
    dpo = torch.randn(2, 3, 6, generator=generator)  # a padded head: one extra column, cut away
    reverse = torch.randn(2, 3, 5, generator=generator)
    loss, stats = distill_token_loss(
        student, dpo, reverse, teacher=aligndistil_teacher, beta=0.1, beta2=10.0, temperature=2.0
    )
    teacher, scale = aligndistil_teacher(dpo[..., :5], reverse, beta=0.1, beta2=10.0)
    expected = scale * reverse_kl(student, teacher / 2.0)
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss.sum(), student)
    # d/dz_s of sum_v p_s (log p_s - log p_t) = p_s * ((log p_s - log p_t) - KL), times the scale
    log_s, log_t = torch.log_softmax(student, -1), torch.log_softmax(teacher / 2.0, -1)
    kl = (log_s.exp() * (log_s - log_t)).sum(-1, keepdim=True)
    torch.testing.assert_close(grad, scale.unsqueeze(-1) * log_s.exp() * (log_s - log_t - kl))
    assert set(stats) == {"distill/kl", "distill/scale"}
    with pytest.raises(ValueError, match="not one of"):
        get_distill_teacher("aligndistill")


def perturbed_tiny_model(seed: int, hidden_size: int = 32, intermediate_size: int = 64):
    """(model, tokenizer): a 2-layer tiny model whose weights differ by seed (the builder's own
    initialisation is fixed), for teachers that disagree with each other and with the policy."""
    tokenizer = build_char_tokenizer()
    spec = TinyModelSpec(
        hidden_size=hidden_size, num_layers=2, num_heads=2, intermediate_size=intermediate_size
    )
    model = build_tiny_causal_lm(spec, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model, tokenizer


def save_teachers(directory, **shape) -> None:
    """Two different tiny models saved as <directory>/dpo and <directory>/reverse."""
    for seed, name in ((1, "dpo"), (2, "reverse")):
        model, tokenizer = perturbed_tiny_model(seed, **shape)
        model.save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)


_model = perturbed_tiny_model


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_equals_full_logits_values_and_gradients(chunk):
    student, tokenizer = _model(0)
    dpo, _ = _model(1)
    reverse, _ = _model(2)
    prompt_ids = torch.randint(3, len(tokenizer), (3, 4))
    prompt_mask = torch.ones(3, 4, dtype=torch.bool)
    prompt_mask[0, :2] = False  # left padding
    response_ids = torch.randint(3, len(tokenizer), (3, 5))
    response_mask = torch.arange(5).unsqueeze(0) < torch.tensor([[5], [2], [4]])
    tensors = (prompt_ids, prompt_mask, response_ids, response_mask)
    token_loss = partial(distill_token_loss, teacher=aligndistil_teacher, beta=0.1, beta2=10.0)

    with torch.no_grad():
        teachers = [response_logits(m, *tensors) for m in (dpo, reverse)]
    full, _ = token_loss(response_logits(student, *tensors), *teachers)
    full_value = torch.where(response_mask, full, 0.0).sum()
    full_grads = torch.autograd.grad(full_value, list(student.parameters()))

    hidden = [response_head_inputs(student, *tensors)]
    with torch.no_grad():
        hidden += [response_head_inputs(m, *tensors) for m in (dpo, reverse)]
    chunked, stats = chunked_token_loss([student, dpo, reverse], hidden, chunk, token_loss)
    value = torch.where(response_mask, chunked, 0.0).sum()
    grads = torch.autograd.grad(value, list(student.parameters()))
    assert full_value > 0.01  # three different models: a loss with gradients to compare
    torch.testing.assert_close(value, full_value)
    for a, b in zip(grads, full_grads):
        torch.testing.assert_close(a, b)
    assert stats["distill/kl"].shape == response_mask.shape
