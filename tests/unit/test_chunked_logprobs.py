"""Memory-lean logprobs (model.logprob_chunk_tokens): values, entropy and gradients equal to the
plain computation, with sampling warps, LoRA and the shared-prefix forward; unsupported heads refused."""

from __future__ import annotations

import pytest
import torch

from rlhf.config import ConfigError, LoraConfig, ModelConfig, TinyModelConfig
from rlhf.models.forward import response_logprobs
from rlhf.models.load import load_causal_lm, load_policy, load_tokenizer
from rlhf.models.options import ForwardOptions
from rlhf.rollout.engine import generate_rollouts
from rlhf.rollout.hf import TransformersEngine
from rlhf.rollout.sampling import SamplingParams


def _model(arch: str, chunk: int, shared_prefix: bool = False, lora: bool = False):
    cfg = ModelConfig(
        source="tiny",
        tiny=TinyModelConfig(arch=arch, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        logprob_chunk_tokens=chunk,
        shared_prefix=shared_prefix,
        lora=LoraConfig(enabled=lora, r=4),
    )
    tokenizer = load_tokenizer(cfg)
    return load_policy(cfg, tokenizer, seed=3), tokenizer


def _options(chunk: int, shared_prefix: bool = False, warp: dict | None = None) -> ForwardOptions:
    return ForwardOptions(shared_prefix=shared_prefix, logprob_chunk_tokens=chunk, warp=warp or {})


def _sampled(model, tokenizer, group_size: int):
    """((prompt ids, prompt mask, response ids, response mask), response mask) of a seeded rollout."""
    torch.manual_seed(0)
    batch = generate_rollouts(
        TransformersEngine.for_model(model, tokenizer),
        ["12+34=", "5+6=", "99+1="],
        {},
        group_size=group_size,
        sampling=SamplingParams(max_new_tokens=7),
    )
    tensors = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    return tensors, batch.response_mask


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize(
    "warp",
    [
        {},
        {"temperature": 0.7, "top_k": 5, "top_p": 0.9},
        {"temperature": 1.3, "min_p": 0.2},
        {"temperature": 0.9, "repetition_penalty": 1.6},
    ],
)
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_chunked_equals_plain(arch, chunk, warp, shared_prefix):
    plain, tokenizer = _model(arch, 0, shared_prefix)
    chunked, _ = _model(arch, chunk, shared_prefix)
    tensors, mask = _sampled(plain, tokenizer, group_size=3)
    results = []
    for model, size in ((plain, 0), (chunked, chunk)):
        model.zero_grad()
        options = _options(size, shared_prefix, warp)
        logprobs, entropy = response_logprobs(model, *tensors, options, with_entropy=True, entropy_grad=True)
        loss = -(torch.where(mask, logprobs, 0.0).sum() + 0.1 * torch.where(mask, entropy, 0.0).sum())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((logprobs.detach(), entropy.detach(), grads))
    (lp0, en0, g0), (lp1, en1, g1) = results
    # The head runs on [rows, chunk, h] slices instead of the whole [rows, T, h]: the same float32
    # products summed in another order. Measured over every case here: logprobs within 2.4e-7,
    # entropies within 4.8e-7, gradients within 1.9e-6 (at values up to 9). The bounds leave 4-20x
    # room for other BLAS kernels; a wrong token, position or warp moves logprobs by 1e-2 or more.
    torch.testing.assert_close(lp1[mask], lp0[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(en1[mask], en0[mask], rtol=0, atol=1e-5)
    for name in g0:
        assert torch.isfinite(g1[name]).all(), name
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # the no-grad pass (old and reference logprobs) takes the same path
        again, none = response_logprobs(chunked, *tensors, _options(chunk, shared_prefix, warp))
    torch.testing.assert_close(again[mask], lp0[mask], rtol=0, atol=1e-5)
    assert none is None


def test_chunked_with_lora_and_the_head_restored_after():
    plain, tokenizer = _model("llama", 0, lora=True)
    chunked, _ = _model("llama", 2, lora=True)
    chunked.load_state_dict(plain.state_dict())
    batch = generate_rollouts(
        TransformersEngine.for_model(plain, tokenizer),
        ["1+2="],
        {},
        group_size=2,
        sampling=SamplingParams(max_new_tokens=5),
    )
    tensors = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    with torch.no_grad():
        ours, _ = response_logprobs(chunked, *tensors, _options(2))
        theirs, _ = response_logprobs(plain, *tensors, _options(0))
        logits = chunked(input_ids=batch.prompt_ids).logits
    # float32 rounding only, as in the test above
    torch.testing.assert_close(ours[batch.response_mask], theirs[batch.response_mask], rtol=0, atol=1e-5)
    assert logits.shape[-1] == len(tokenizer)  # the LM head is a head again once the pass is over


def test_a_head_that_is_not_plain_is_refused():
    cfg = ModelConfig(source="tiny", logprob_chunk_tokens=4)
    tokenizer = load_tokenizer(cfg)
    model = load_causal_lm(cfg, tokenizer)
    from rlhf.models import load as load_module

    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ConfigError, match="model.logprob_chunk_tokens: the 'llama' family is not supported"):
        load_module._checked_family(model, cfg)


@pytest.mark.parametrize("shared_prefix", [False, True])
def test_chunked_frozen_passes_equal_plain(shared_prefix):
    """The other passes that read a distribution per token honour the chunk size too: the curiosity
    pass (logprobs with the hidden states, PPO's reference) and cDPO's contrastive scores."""
    from rlhf.models.forward import response_logprobs_and_states
    from rlhf.models.token_scorers import PairTokenScorer

    plain, tokenizer = _model("qwen2", 0, shared_prefix)
    chunked, _ = _model("qwen2", 3, shared_prefix)
    negatives = [_model("qwen2", chunk, shared_prefix)[0] for chunk in (0, 3)]
    for model in negatives:  # another model than the positive one
        torch.nn.init.normal_(
            model.get_output_embeddings().weight, std=0.5, generator=torch.Generator().manual_seed(9)
        )
    tensors, mask = _sampled(plain, tokenizer, group_size=2)
    with torch.no_grad():
        warp = {"temperature": 0.7, "top_k": 5, "repetition_penalty": 1.3}
        (a, a_states, a_next), (b, b_states, b_next) = (
            response_logprobs_and_states(m, *tensors, _options(size, shared_prefix, warp))
            for m, size in ((plain, 0), (chunked, 3))
        )
        scores = [
            PairTokenScorer(
                positive=positive, negative=negative, contrast_beta=0.5, options=_options(size, shared_prefix)
            )._contrast_scores(tensors)
            for positive, negative, size in zip((plain, chunked), negatives, (0, 3))
        ]
    # the same float32 operations on the same rows, cut into chunks. Measured here: the logprobs equal
    # bit for bit, the contrastive scores (probabilities) 1.5e-8 apart; the bound leaves room for BLAS
    # kernels that round a chunk-shaped matmul differently from the full one
    torch.testing.assert_close(b[mask], a[mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_states, a_states, rtol=0, atol=0)
    torch.testing.assert_close(b_next, a_next, rtol=0, atol=0)
    torch.testing.assert_close(scores[1][mask], scores[0][mask], rtol=1e-5, atol=1e-6)  # 1.5e-8 measured
    assert 0 < float(scores[0][mask].min()) and float(scores[0][mask].max()) < 1


def test_the_chunk_is_chosen_by_size_unless_set():
    """model.logprob_chunk_tokens=null: whole while the pass's fp32 logits fit in 512 MB, else
    chunks of at most 256 MB of logits; an explicit size (or 0) is kept; families whose logits are
    not the head's output as it is never chunk."""
    from types import SimpleNamespace

    qwen2, gemma2 = SimpleNamespace(model_type="qwen2"), SimpleNamespace(model_type="gemma2")
    auto = ForwardOptions()
    assert auto.chunk_tokens(rows=4, tokens=64, vocab=32_000, config=qwen2) == 0  # 33 MB of logits
    # 4 rows of 1,536 tokens at Qwen2's 151,936-token vocabulary: 3.7 GB of logits, chunks of 110
    assert auto.chunk_tokens(rows=4, tokens=1536, vocab=151_936, config=qwen2) == 256 * 2**20 // (
        4 * 151_936 * 4
    )
    assert auto.chunk_tokens(rows=4, tokens=1536, vocab=151_936, config=gemma2) == 0
    assert ForwardOptions(logprob_chunk_tokens=0).chunk_tokens(4, 1536, 151_936, qwen2) == 0
    assert ForwardOptions(logprob_chunk_tokens=7).chunk_tokens(4, 8, 21, qwen2) == 7
