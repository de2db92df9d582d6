"""Padding-free forward (model.padding_free): every row's valid tokens in one sequence with
positions restarting per row equals the padded batch, values and gradients, for Llama, Mistral and
Phi3 (windows shorter than the rows), Qwen2 and Qwen3 (sliding layers), sdpa and eager, GQA,
left-padded prompts, empty responses; the chunked logprob path and LoRA compose with it."""

from __future__ import annotations

import pytest
import torch

from rlhf.models.forward import response_logprobs
from rlhf.models.options import ForwardOptions
from tests.unit.test_shared_prefix_windows import BATCH, FAMILIES, _model, _weighted_backward

PACKED = ForwardOptions(padding_free=True)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_rows_equal_the_padded_batch(family, attention):
    plain_logprobs, plain_grads = _weighted_backward(_model(family, attention))
    packed_logprobs, packed_grads = _weighted_backward(_model(family, attention), options=PACKED)
    mask = BATCH[3]
    # fp32: the same attention terms, summed over other padded widths (measured: below 2e-6)
    torch.testing.assert_close(packed_logprobs[mask], plain_logprobs[mask], rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_free_with_chunked_logprobs_and_entropy():
    plain = _model("qwen2", "sdpa")
    packed = _model("qwen2", "sdpa")
    mask = BATCH[3]
    a, entropy_a = response_logprobs(plain, *BATCH, with_entropy=True)
    b, entropy_b = response_logprobs(
        packed, *BATCH, ForwardOptions(padding_free=True, logprob_chunk_tokens=2), with_entropy=True
    )
    torch.testing.assert_close(b[mask], a[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy_b[mask], entropy_a[mask], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("repeats", [True, False], ids=["groups", "no-repeated-prompt"])
def test_padding_free_with_the_shared_prefix(repeats, monkeypatch):
    """Both switches on: rows that repeat a prompt take the shared layout (the prompt once, the
    group's responses back to back), a batch without repeats is packed padding-free; either way the
    padded batch's values and gradients."""
    from rlhf.models import forward
    from rlhf.models.shared_prefix import shared_prefix_attention
    from tests.unit.test_shared_prefix import grouped_batch

    taken = []
    for path in ("_packed_forward", "_padding_free_logits"):
        original = getattr(forward, path)
        monkeypatch.setattr(
            forward,
            path,
            lambda *a, _original=original, _path=path, **k: taken.append(_path) or _original(*a, **k),
        )
    batch = BATCH if repeats else grouped_batch([0, 1, 2], [6, 2, 9], [7, 3, 0], seed=3)
    both = _model("mistral", shared_prefix_attention("sdpa"))
    both_options = ForwardOptions(shared_prefix=True, padding_free=True)
    both_logprobs, both_grads = _weighted_backward(both, batch, both_options)
    assert taken == ["_packed_forward" if repeats else "_padding_free_logits"]
    plain_logprobs, plain_grads = _weighted_backward(_model("mistral", "sdpa"), batch)
    mask = batch[3]
    # fp32, the same terms summed in another order (measured: below 2e-6, as in the tests above)
    torch.testing.assert_close(both_logprobs[mask], plain_logprobs[mask], rtol=1e-5, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(both_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_reward_model_and_critic_passes_equal_the_padded_batch(family):
    """sequence_scores (the score at each row's last valid token; an empty response: the prompt's
    last) and token_values (the value where each response token is predicted), with gradients."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    from rlhf.models.forward import sequence_scores, token_values
    from tests.unit.test_shared_prefix_windows import FAMILIES

    mask = BATCH[3]
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(2))
    for auto, score in (
        (AutoModelForSequenceClassification, lambda m, o: sequence_scores(m, *BATCH, o)),
        (AutoModelForTokenClassification, lambda m, o: token_values(m, *BATCH, o) * weights * mask),
    ):
        found = []
        for padding_free in (False, True):
            config = FAMILIES[family]()
            config.num_labels = 1
            torch.manual_seed(0)
            model = auto.from_config(config, attn_implementation="sdpa").float().eval()  # no dropout
            values = score(model, ForwardOptions(padding_free=padding_free))
            values.sum().backward()
            found.append((values.detach(), {n: p.grad for n, p in model.named_parameters()}))
        (plain, plain_grads), (packed, packed_grads) = found
        # fp32 sums in another order (measured: below 2e-6, as above)
        torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_free_on_an_untested_family_is_refused():
    """Packed rows rely on the attention building its mask from restarting positions: a family
    whose attention is not tested that way raises instead of letting rows attend to each other."""
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="padding-free rows, which the 'gpt2' family does not support"):
        response_logprobs(model, *BATCH, PACKED)
