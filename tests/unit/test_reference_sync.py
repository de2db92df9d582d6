"""TR-DPO's moving reference (rlhf.models.reference): the mixing rule on every parameter, a tied LM
head mixed once, the saved weights restoring the reference, and a mismatched model refused."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from rlhf.config import ConfigError, ModelConfig
from rlhf.models.load import load_causal_lm, load_tokenizer
from rlhf.models.reference import ReferenceSync


def _model(seed: int, **tiny):
    cfg = ModelConfig()
    for key, value in tiny.items():
        setattr(cfg.tiny, key, value)
    return load_causal_lm(cfg, load_tokenizer(cfg), seed=seed)


def _engine(module):
    return SimpleNamespace(
        module=module,
        is_main=True,
        gathered_parameters=lambda parameters=None, writable=False: contextlib.nullcontext(),
    )


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_the_reference_moves_toward_the_policy_every_sync_steps(alpha):
    policy, reference = _model(seed=1), _model(seed=2)
    assert policy.config.tie_word_embeddings  # the shared LM head must be mixed once, not twice
    mine, before = _weights(policy), _weights(reference)
    sync = ReferenceSync(_engine(policy), reference, alpha=alpha, sync_steps=2)
    assert sync.after_step(1) == {}
    assert all(torch.equal(p, before[n]) for n, p in reference.named_parameters())
    assert "time/reference_sync" in sync.after_step(2)
    for name, p in reference.named_parameters():
        expected = alpha * mine[name] + (1 - alpha) * before[name]
        # mul_ then add_ rounds once more than the expression: float32 ulps of values below 1
        torch.testing.assert_close(p, expected, rtol=0, atol=3e-7, msg=name)
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    assert all(torch.equal(p, mine[n]) for n, p in policy.named_parameters())  # the policy is untouched


def test_saved_weights_restore_the_moved_reference():
    policy, reference = _model(seed=1), _model(seed=2)
    sync = ReferenceSync(_engine(policy), reference, alpha=0.5, sync_steps=1)
    sync.after_step(1)
    state = sync.state_dict()
    assert set(state) == {n for n, _ in reference.named_parameters()}
    fresh = _model(seed=3)
    ReferenceSync(_engine(policy), fresh, alpha=0.5, sync_steps=1).load_state_dict(state)
    assert all(torch.equal(p, state[n]) for n, p in fresh.named_parameters())


def test_a_reference_of_another_shape_is_refused():
    with pytest.raises(ConfigError, match="reference.sync"):
        ReferenceSync(_engine(_model(seed=1)), _model(seed=2, num_layers=2), alpha=0.5, sync_steps=1)
