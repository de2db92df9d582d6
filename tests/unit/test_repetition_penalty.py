"""rollout.repetition_penalty: transformers generate samples with it over each row's real context,
and every logprob pass scores the sampled tokens under that same distribution; a model's own
generation defaults never reach the rollout."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from rlhf.config import ConfigError, ModelConfig, RolloutConfig, TinyModelConfig
from rlhf.models.forward import response_logprobs
from rlhf.models.load import load_policy, load_tokenizer
from rlhf.models.options import ForwardOptions
from rlhf.ops import first_seen_positions, seen_in_context, warp_logits
from rlhf.rollout.engine import generate_rollouts
from rlhf.rollout.hf import ContextRepetitionPenalty, TransformersEngine, generate_groups
from rlhf.rollout.sampling import SamplingParams, pad_prompts, response_mask_from_ids

PROMPTS = ["12+34=", "5+6=", "999+1="]  # three lengths: two rows are left-padded


def test_seen_logits_are_divided_when_positive_and_multiplied_when_negative():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = warp_logits(logits, repetition_penalty=2.0, seen=torch.tensor([[True, True, False, False]]))
    assert torch.equal(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    # transformers' processor on the same context (tokens 0 and 1, no padding) agrees
    assert torch.equal(out, RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 1]]), logits.clone()))
    with pytest.raises(ValueError, match="tokens seen"):
        warp_logits(logits, repetition_penalty=2.0)


def test_context_is_the_real_prompt_and_the_response_so_far():
    prompt_ids = torch.tensor([[0, 0, 5, 6], [7, 5, 5, 8]])
    prompt_mask = torch.tensor([[False, False, True, True], [True, True, True, True]])
    response_ids = torch.tensor([[6, 9, 9, 0], [3, 2, 3, 4]])
    response_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    first = first_seen_positions(prompt_ids, prompt_mask, response_ids, response_mask)
    never = 4  # the response length
    # row 0: the pad id 0 is neither in the real prompt nor in the real response
    assert first[0].tolist() == [never, never, never, never, never, -1, -1, never, never, 1]
    assert first[1].tolist() == [never, never, 1, 0, 3, -1, never, -1, -1, never]
    seen = seen_in_context(first, torch.arange(4), vocab_size=12)  # wider than any id present
    assert seen.shape == (2, 4, 12)
    assert not seen[0, 1, 9] and seen[0, 2, 9]  # token 9 counts from the position after it
    assert seen[1, 0].nonzero().flatten().tolist() == [5, 7, 8]
    assert seen[1, 3].nonzero().flatten().tolist() == [2, 3, 5, 7, 8]
    assert not seen[:, :, 10:].any()


def _policy(seed: int = 0):
    cfg = ModelConfig(source="tiny", tiny=TinyModelConfig(hidden_size=32, num_layers=2, intermediate_size=64))
    tokenizer = load_tokenizer(cfg)
    return load_policy(cfg, tokenizer, seed=seed), tokenizer


@pytest.mark.parametrize("chunk", [0, 3])
def test_generate_samples_from_the_distribution_the_logprob_pass_scores(chunk):
    model, tokenizer = _policy()
    # padding with the EOS token, as many models ship: transformers' own processor would penalise
    # EOS in left-padded rows (it reads pads as context), which this comparison would show
    tokenizer.pad_token = tokenizer.eos_token
    sampling = SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.95, repetition_penalty=1.8)
    group = 3
    prompt_ids, prompt_mask = pad_prompts(
        [tokenizer(p)["input_ids"] for p in PROMPTS], tokenizer.pad_token_id, torch.device("cpu")
    )
    config = sampling.generation_config(tokenizer)
    config.return_dict_in_generate, config.output_scores = True, True
    torch.manual_seed(0)
    out = generate_groups(
        model,
        prompt_ids,
        prompt_mask,
        group,
        config,
        logits_processor=LogitsProcessorList(
            [ContextRepetitionPenalty(sampling.repetition_penalty, prompt_ids, prompt_mask, group)]
        ),
    )
    response_ids = out.sequences[:, prompt_ids.shape[1] :]
    mask, _ = response_mask_from_ids(response_ids, tokenizer.eos_token_id)
    # generate's scores are the logits after every processor and warper: the sampled distribution
    sampled = torch.stack(out.scores, dim=1).log_softmax(-1).gather(-1, response_ids[..., None])[..., 0]
    rows = (prompt_ids.repeat_interleave(group, 0), prompt_mask.repeat_interleave(group, 0))
    with torch.no_grad():
        options = ForwardOptions(logprob_chunk_tokens=chunk, warp=sampling.warp())
        scored, _ = response_logprobs(model, *rows, response_ids, mask, options)
        unpenalized, _ = response_logprobs(
            model, *rows, response_ids, mask, ForwardOptions(warp=dict(temperature=0.8, top_p=0.95))
        )
    # the same float32 operations in another batch layout: 4.8e-7 measured, 0.016 with pads as
    # context; the bound leaves room for other BLAS kernels and stays far below that error
    torch.testing.assert_close(scored[mask], sampled[mask], rtol=0, atol=1e-5)
    assert (unpenalized - sampled)[mask].abs().max() > 0.1  # the penalty moves the distribution
    # the recipes' rollout goes through the same pieces: the same seed draws the same tokens
    torch.manual_seed(0)
    batch = generate_rollouts(
        TransformersEngine.for_model(model, tokenizer), PROMPTS, {}, group_size=group, sampling=sampling
    )
    assert torch.equal(batch.response_ids, torch.where(mask, response_ids, tokenizer.pad_token_id))


def test_a_models_generation_defaults_do_not_reach_the_rollout():
    model, tokenizer = _policy()
    sampling = SamplingParams(max_new_tokens=12)

    def rollout() -> torch.Tensor:
        torch.manual_seed(0)
        return generate_rollouts(
            TransformersEngine.for_model(model, tokenizer), PROMPTS, {}, group_size=3, sampling=sampling
        ).response_ids

    plain = rollout()
    # what a chat model's generation_config.json can hold; transformers fills unset fields from it
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.no_repeat_ngram_size = 1
    model.generation_config.typical_p = 0.2
    assert torch.equal(rollout(), plain)
    assert model.generation_config.repetition_penalty == 3.0  # handed back after generate


def test_a_penalty_must_be_positive():
    with pytest.raises(ConfigError, match="rollout.repetition_penalty"):
        RolloutConfig(repetition_penalty=0.0)


def test_nthr_scores_tokens_under_the_penalised_distribution(monkeypatch):
    """NTHR's probabilities of the sampled tokens are those of the logprob pass, penalty included."""
    from rlhf.models import token_scorers

    model, tokenizer = _policy()
    sampling = SamplingParams(max_new_tokens=8, temperature=0.9, repetition_penalty=1.8)
    torch.manual_seed(0)
    batch = generate_rollouts(
        TransformersEngine.for_model(model, tokenizer), PROMPTS[:1], {}, group_size=4, sampling=sampling
    )
    seen_by_nthr = []
    monkeypatch.setattr(token_scorers, "nthr_scores", lambda residual, *a: seen_by_nthr.append(residual) or 0)
    monkeypatch.setattr(token_scorers, "nthr_advantage_scale", lambda scores, mask, *a, **k: mask.float())
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    token_scorers.nthr_token_scale(
        model, batch, advantages, group_size=4, options=ForwardOptions(warp=sampling.warp()), chunk_tokens=3
    )
    rows, mask = (batch.prompt_ids, batch.prompt_mask, batch.response_ids), batch.response_mask
    with torch.no_grad():
        scored, _ = response_logprobs(model, *rows, mask, ForwardOptions(warp=sampling.warp()))
    vocab = torch.unique(batch.response_ids[mask])
    onehot = (batch.response_ids.unsqueeze(-1) == vocab).float()
    # NTHR gets (one-hot - probabilities) over the group's vocabulary: the sampled token's probability
    probs = ((onehot - seen_by_nthr[0]) * onehot).sum(-1)
    # the same head and warp on chunks of another size: 3.7e-8 measured, 0.02 without the penalty;
    # the bound leaves room for BLAS kernels that round a chunk-shaped matmul differently
    torch.testing.assert_close(probs[mask], scored.exp()[mask], rtol=0, atol=1e-6)


def test_the_top_k_gate_reads_the_penalised_distribution():
    """CD-RLHF's gate (rollout `record_topk`) marks tokens outside the k most likely of the
    distribution sampled from, the penalty included: sampling with top-k 1 picks each step's top
    token, so nothing is outside the top 1, though the penalty moves that top token."""
    model, tokenizer = _policy()
    sampling = SamplingParams(max_new_tokens=12, top_k=1, repetition_penalty=4.0)
    torch.manual_seed(0)
    batch = generate_rollouts(
        TransformersEngine.for_model(model, tokenizer),
        PROMPTS,
        {},
        group_size=2,
        sampling=sampling,
        record_topk=1,
    )
    assert not batch.outside_topk.any()
    torch.manual_seed(0)
    plain = generate_rollouts(
        TransformersEngine.for_model(model, tokenizer),
        PROMPTS,
        {},
        group_size=2,
        sampling=SamplingParams(max_new_tokens=12, top_k=1),
    )
    assert not torch.equal(plain.response_ids, batch.response_ids)  # the penalty changed the picks
