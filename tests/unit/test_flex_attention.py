"""FlexAttention for the packed layouts (`model.attn_implementation=flex_attention`): the shared
prefix, padding-free bins and both together give the padded batch's log-probs, entropies, values and
scores for Llama, Mistral and Phi3 (windows as arguments), Qwen2 and Qwen3 (sliding layers), with
GQA, left-padded prompts, groups of 1, 2 and 5 and an empty response; forward passes on CPU (torch
has no FlexAttention backward there, so training on CPU is refused), gradients in bf16 on a GPU.
Compiled kernels are reused across batch shapes that share a length bucket."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from rlhf.config import ConfigError, OptimConfig
from rlhf.distributed.engine import SingleProcessEngine
from rlhf.models.flex import FLEX_BLOCK, bucket_length
from rlhf.models.forward import response_logprobs, token_values
from rlhf.models.options import ForwardOptions
from rlhf.models.shared_prefix import shared_prefix_attention
from tests.unit.test_shared_prefix import grouped_batch
from tests.unit.test_shared_prefix_windows import BATCH, FAMILIES

FLEX = shared_prefix_attention("flex_attention")  # what model.attn_implementation=flex_attention loads
LAYOUTS = {
    "shared_prefix": ForwardOptions(shared_prefix=True),
    "padding_free": ForwardOptions(padding_free=True),
    "both": ForwardOptions(shared_prefix=True, padding_free=True),
}


def _model(family: str, attention: str, auto=AutoModelForCausalLM, **sizes) -> torch.nn.Module:
    config = FAMILIES[family]()
    config.num_labels = 1
    for name, value in sizes.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return auto.from_config(config, attn_implementation=attention).float().eval()


def test_lengths_are_bucketed_to_few_block_multiples():
    assert [bucket_length(n) for n in (1, 128, 129, 300, 1100, 6000)] == [128, 128, 256, 384, 1280, 6144]
    for n in range(1, 20000, 37):
        bucket = bucket_length(n)
        assert bucket >= n and bucket % FLEX_BLOCK == 0
        assert bucket - n < max(FLEX_BLOCK, n / 4)  # padding: under a block, or a quarter
    assert len({bucket_length(n) for n in range(1025, 2049)}) == 4  # four sizes per doubling


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_every_packed_layout_equals_the_padded_batch(family):
    plain, flex = _model(family, "sdpa"), _model(family, FLEX)
    expected, expected_entropy = response_logprobs(plain, *BATCH, with_entropy=True)
    mask = BATCH[3]
    for name, options in LAYOUTS.items():
        logprobs, entropy = response_logprobs(flex, *BATCH, options, with_entropy=True)
        # fp32, the bound of the SDPA layout tests (test_shared_prefix_windows.py): another kernel
        # sums the same attention terms in another order; measured differences are below 1e-6
        torch.testing.assert_close(logprobs[mask], expected[mask], rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(entropy[mask], expected_entropy[mask], rtol=1e-5, atol=1e-5, msg=name)


@torch.no_grad()
def test_critic_values_equal_the_padded_batch():
    plain = _model("qwen2", "sdpa", AutoModelForTokenClassification)
    flex = _model("qwen2", FLEX, AutoModelForTokenClassification)
    expected, mask = token_values(plain, *BATCH), BATCH[3]
    for name, options in LAYOUTS.items():
        torch.testing.assert_close(token_values(flex, *BATCH, options)[mask], expected[mask], msg=name)


@torch.no_grad()
def test_the_mask_is_what_makes_the_numbers_equal():
    """Without the window's term the windowed families differ: the comparison above can fail."""
    flex = _model("mistral", FLEX)
    expected, _ = response_logprobs(_model("mistral", "sdpa"), *BATCH)
    for module in flex.modules():
        if hasattr(module, "sliding_window"):
            module.sliding_window = None
    flex.config.sliding_window = None
    logprobs, _ = response_logprobs(flex, *BATCH, LAYOUTS["padding_free"])
    mask = BATCH[3]
    assert (logprobs[mask] - expected[mask]).abs().max() > 1e-3


@torch.no_grad()
def test_compiled_kernels_are_reused_across_batch_shapes():
    from torch._dynamo.utils import counters

    flex = _model("llama", FLEX)

    def compiled_after(batch) -> int:
        response_logprobs(flex, *batch, LAYOUTS["both"])
        return counters["stats"]["unique_graphs"]

    first = compiled_after(
        grouped_batch([0, 0, 1, 1], [5, 3], [4, 2, 6, 1], prompt_width=6, response_width=6)
    )
    # other groups, prompt and response widths, all under one 128-token bucket
    for shape in (([0, 1, 0], [7, 2], [3, 5, 0]), ([0, 0, 0, 0, 0], [9], [7, 1, 2, 6, 4])):
        assert compiled_after(grouped_batch(*shape, prompt_width=9, response_width=7)) == first
    # a longer batch falls in another bucket: one more kernel, so the count can move
    longer = grouped_batch([0, 0, 1, 1], [60, 50], [60, 60, 60, 60], prompt_width=60, response_width=60)
    assert compiled_after(longer) > first


def test_training_with_flex_attention_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="flex_attention trains on CUDA only"):
        SingleProcessEngine(_model("llama", FLEX), OptimConfig(), 1, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_gradients_on_gpu_equal_the_padded_batch(family, layout):
    """Compiled Triton kernels on CUDA, bf16: log-probs and every gradient within bf16 rounding of
    the padded batch through SDPA."""
    batch = tuple(
        t.cuda()
        for t in grouped_batch(
            [0, 0, 0, 0, 1, 1, 1, 1, 2], [40, 17, 33], [30, 2, 25, 0, 9, 30, 14, 1, 20], 48, 30, seed=3
        )
    )
    mask = batch[3]
    results = []
    for attention, options in (("sdpa", ForwardOptions()), (FLEX, LAYOUTS[layout])):
        # heads of 64 dimensions: Triton's kernels take no fewer than 16
        model = _model(family, attention, hidden_size=256, intermediate_size=512, head_dim=64)
        model = model.to(device="cuda", dtype=torch.bfloat16).train()
        logprobs, _ = response_logprobs(model, *batch, options)
        (logprobs * mask).sum().backward()
        results.append((logprobs.float(), {n: p.grad.float() for n, p in model.named_parameters()}))
    (plain, plain_grads), (flex, flex_grads) = results
    # bf16 rounding (8 bits of mantissa) over two layers: the bounds of the other bf16 GPU layout
    # test (test_shared_prefix.py::test_bf16_on_gpu_matches_the_repeated_layout)
    torch.testing.assert_close(flex[mask], plain[mask], rtol=2e-2, atol=5e-2)
    for name, grad in plain_grads.items():
        error = (flex_grads[name] - grad).norm() / grad.norm().clamp(min=1e-6)
        assert error < 5e-2, (name, float(error))
