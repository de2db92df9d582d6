"""Padding-free forward (model.padding_free): every row's valid tokens in one sequence with
positions restarting per row equals the padded batch, values and gradients, for Llama, Mistral and
Phi3 (windows shorter than the rows), Qwen2 and Qwen3 (sliding layers), sdpa and eager, GQA,
left-padded prompts, empty responses; the chunked logprob path and LoRA compose with it."""

from __future__ import annotations

import pytest
import torch

from rlhf.models.forward import response_logprobs
from tests.unit.test_shared_prefix_windows import BATCH, FAMILIES, _model, _weighted_backward


def _padding_free(model):
    model.padding_free = True
    return model


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_rows_equal_the_padded_batch(family, attention):
    plain_logprobs, plain_grads = _weighted_backward(_model(family, attention))
    packed_logprobs, packed_grads = _weighted_backward(_padding_free(_model(family, attention)))
    mask = BATCH[3]
    # fp32: the same attention terms, summed over other padded widths (measured: below 2e-6)
    torch.testing.assert_close(packed_logprobs[mask], plain_logprobs[mask], rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_free_with_chunked_logprobs_and_entropy():
    plain = _model("qwen2", "sdpa")
    packed = _padding_free(_model("qwen2", "sdpa"))
    packed.logprob_chunk_tokens = 2
    mask = BATCH[3]
    a, entropy_a = response_logprobs(plain, *BATCH, with_entropy=True)
    b, entropy_b = response_logprobs(packed, *BATCH, with_entropy=True)
    torch.testing.assert_close(b[mask], a[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy_b[mask], entropy_a[mask], rtol=1e-5, atol=1e-5)
