"""The LoRA reference (the policy with its adapters disabled) equals the base model without adapters
in every forward layout: plain, shared prefix, padding-free, chunked logprobs and their
combinations, with adapters on every targetable module, the LM head and the embeddings included.
(The chunked and padding-free passes apply the LM head outside the model call: it must run with the
adapters off there too.)"""

from __future__ import annotations

import itertools

import pytest
import torch

from rlhf.config import DistributedConfig, LoraConfig, ModelConfig, OptimConfig, TinyModelConfig
from rlhf.distributed import build_engine
from rlhf.models.forward import response_logprobs
from rlhf.models.load import load_causal_lm, load_policy, load_reference, load_tokenizer
from rlhf.models.options import ForwardOptions
from tests.unit.test_shared_prefix import grouped_batch

TARGETS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
    "embed_tokens",
]
LAYOUTS = [  # (shared prefix, padding-free, logprob chunk)
    (shared, packed, chunk)
    for shared, packed, chunk in itertools.product([False, True], [False, True], [0, 3])
]


def _config(shared: bool, packed: bool, chunk: int, lora: bool) -> ModelConfig:
    return ModelConfig(
        source="tiny",
        tiny=TinyModelConfig(arch="qwen2", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        shared_prefix=shared,
        padding_free=packed,
        logprob_chunk_tokens=chunk,
        lora=LoraConfig(enabled=lora, r=4, target_modules=TARGETS if lora else []),
    )


@pytest.mark.parametrize(("shared", "packed", "chunk"), LAYOUTS)
def test_lora_reference_equals_the_base_model_in_every_layout(shared, packed, chunk):
    cfg = _config(shared, packed, chunk, lora=True)
    tokenizer = load_tokenizer(cfg)
    policy = load_policy(cfg, tokenizer, seed=5)
    with torch.no_grad():  # adapters that move every output (peft starts B at zero)
        for name, param in policy.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(hash(name) % 1000))
    engine = build_engine(policy, OptimConfig(), DistributedConfig(), 1)
    reference = load_reference(cfg, tokenizer, engine, seed=5)
    base = load_causal_lm(_config(shared, packed, chunk, lora=False), tokenizer, seed=5).eval()
    tensors = grouped_batch([0, 0, 0, 1, 1], [4, 7], [5, 2, 0, 6, 3], seed=2)
    mask = tensors[3]
    options = ForwardOptions.from_config(cfg, warp={"temperature": 0.8})
    with torch.no_grad():
        expected, _ = response_logprobs(base, *tensors, options)
        got, _ = response_logprobs(reference, *tensors, options)
        adapted, _ = response_logprobs(engine.model, *tensors, options)
    # measured: equal bit for bit in all 8 layouts (the same weights, the same kernels); the bound
    # leaves room for BLAS kernels that round a chunk-shaped matmul another way, while the lm_head
    # adapter left on moved logprobs by up to 28.7 nats
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert (adapted - expected)[mask].abs().max() > 1e-2  # the adapters do change the policy
