"""CD-RLHF curiosity: prediction error and loss on hand-made tensors, per-sequence whitening, the
top-k gate (from logits and as recorded during generation), and the hidden states it reads."""

from __future__ import annotations

import math

import torch

from rlhf.intrinsic import (
    Curiosity,
    CuriosityModel,
    TopKRecorder,
    curiosity_loss,
    intrinsic_reward,
    outside_topk,
    prediction_error,
    whiten_per_sequence,
)


def test_prediction_error_is_half_the_plain_l2_norm():
    target = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    predicted = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]])
    error = prediction_error(target, predicted)
    assert error.tolist() == [[2.5, 0.0]]  # 0.5 * 5, not 0.5 * 25
    mask = torch.tensor([[True, True]])
    assert float(curiosity_loss(error, mask)) == 1.25
    assert float(curiosity_loss(error, torch.tensor([[True, False]]))) == 2.5


def test_whitening_is_per_sequence_over_valid_tokens():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0], [10.0, 30.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    out = whiten_per_sequence(values, mask, eps=0.0)
    # row 0: mean 2, unbiased var 1; row 1: mean 20, unbiased var 200
    expected = torch.tensor([[-1.0, 0.0, 1.0, 0.0], [-10 / math.sqrt(200), 10 / math.sqrt(200), 0.0, 0.0]])
    torch.testing.assert_close(out, expected)


def test_gate_after_whitening_keeps_negative_rewards():
    error = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    gate = torch.tensor([[True, False, True]])
    reward = intrinsic_reward(error, mask, gate)
    torch.testing.assert_close(reward, torch.tensor([[-1.0, 0.0, 1.0]]), rtol=0, atol=1e-6)


def test_outside_topk():
    logits = torch.tensor([[0.1, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 2.9]])
    tokens = torch.tensor([1, 3])
    assert outside_topk(logits, tokens, k=1).tolist() == [False, True]
    assert outside_topk(logits, tokens, k=2).tolist() == [False, False]


def test_recorder_sees_the_processed_distribution_during_generation():
    """The gate comes from the generation itself: it matches the top-1 of the logprob pass."""
    from transformers import GenerationConfig, LogitsProcessorList

    from rlhf.models.forward import response_logits
    from rlhf.models.tiny import TinyModelSpec, build_char_tokenizer, build_tiny_causal_lm
    from rlhf.rollout.sampling import response_mask_from_ids

    tokenizer = build_char_tokenizer()
    model = build_tiny_causal_lm(TinyModelSpec(hidden_size=32, num_layers=2, num_heads=2), tokenizer).eval()
    prompt = tokenizer(["12+3=", "4+5="], padding=True, padding_side="left", return_tensors="pt")
    recorder = TopKRecorder(k=1)
    torch.manual_seed(0)
    config = GenerationConfig(
        do_sample=True,
        max_new_tokens=6,
        temperature=0.7,
        top_k=5,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=-1,
    )
    output = model.generate(
        **prompt, generation_config=config, logits_processor=LogitsProcessorList([recorder])
    )
    response = output[:, prompt["input_ids"].shape[1] :]
    gate = recorder.outside(response)
    mask, _ = response_mask_from_ids(response, -1)
    logits = response_logits(model, prompt["input_ids"], prompt["attention_mask"].bool(), response, mask)
    assert torch.equal(gate, outside_topk(logits, response, k=1))


def test_curiosity_source_and_update():
    torch.manual_seed(0)
    hidden, rows, width = 8, 3, 5
    model = CuriosityModel(hidden, hidden, 16)
    embedding = torch.nn.Embedding(20, hidden)

    class Batch:
        response_ids = torch.randint(0, 20, (rows, width))
        response_mask = torch.arange(width)[None, :] < torch.tensor([[5], [3], [1]])
        ref_states = torch.randn(rows, width, hidden)
        ref_next_states = torch.randn(rows, width, hidden)
        outside_topk = torch.tensor([[True, False, True, True, False]] * rows)

    source = Curiosity(model, embedding, eta=0.1, lr=1e-2)
    rewards, metrics = source(Batch)
    assert rewards.shape == (rows, width)
    assert (rewards[~(Batch.response_mask & Batch.outside_topk)] == 0).all()
    assert 0 < metrics["curiosity/gated_fraction"] < 1
    before = source.update(Batch)["curiosity/loss"]
    for _ in range(30):
        after = source.update(Batch)["curiosity/loss"]
    assert after < before  # the forward model learns the transitions it sees
    assert embedding.weight.grad is None  # actions are detached: nothing reaches the policy
