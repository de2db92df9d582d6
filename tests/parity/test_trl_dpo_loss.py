"""Parity of our DPO-family losses with TRL's own code on random inputs.

TRL computes the DPO loss inside `DPOTrainer._compute_loss`; we call that method on a minimal
stand-in object whose model forward returns our random per-token logprobs (and precomputed reference
logprobs), so TRL's own code does the arithmetic. SimPO lives in TRL's CPO trainer
(`CPOTrainer.cpo_loss` on length-averaged logprobs). Loss types: sigmoid, hinge, ipo, robust, simpo.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

from rlhf.losses.preference import preference_loss, sequence_logratios  # noqa: E402


class _Accelerator:
    device = torch.device("cpu")

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _random_pairs(seed: int, pairs: int = 5, width: int = 7):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand((2 * pairs, width), generator=g) * 4  # [chosen; rejected]
    ref_logprobs = -torch.rand((2 * pairs, width), generator=g) * 4
    lengths = torch.randint(1, width + 1, (2 * pairs,), generator=g)
    mask = torch.arange(width).expand(2 * pairs, width) < lengths[:, None]
    return logprobs, ref_logprobs, mask


def _trl_dpo_loss(logprobs, ref_logprobs, mask, *, loss_type, beta, label_smoothing):
    """TRL's DPO loss on rows [chosen; rejected]: one prompt token, then the completion tokens."""
    rows, width = logprobs.shape
    per_token = torch.where(mask, logprobs, 0.0)  # TRL's fused head returns 0 at label -100
    ref_sums = torch.where(mask, ref_logprobs, 0.0).sum(-1)
    completion_mask = torch.cat([torch.zeros(rows, 1, dtype=torch.long), mask.long()], dim=1)
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(rows, width),
        mean_logits=torch.zeros(rows, width),
        is_top1=torch.zeros(rows, width, dtype=torch.bool),
    )
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(rows, width + 1, dtype=torch.long),
        "attention_mask": torch.ones(rows, width + 1, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_sums[: rows // 2],
        "ref_rejected_logps": ref_sums[rows // 2 :],
    }
    loss = trl_dpo.DPOTrainer._compute_loss(stand_in, lambda **kwargs: outputs, inputs, False)
    return loss, stand_in._metrics["train"]


@pytest.mark.parametrize(
    ("loss_type", "label_smoothing"), [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)]
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_losses_match_trl(loss_type, label_smoothing, seed):
    logprobs, ref_logprobs, mask = _random_pairs(seed)
    beta = 0.3
    expected, trl_metrics = _trl_dpo_loss(
        logprobs, ref_logprobs, mask, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing
    )
    pairs = logprobs.shape[0] // 2
    loss, needs_reference = preference_loss(loss_type, beta=beta, label_smoothing=label_smoothing)
    assert needs_reference
    logratios = sequence_logratios(logprobs, ref_logprobs, mask)
    lengths = mask.sum(-1)
    ours = loss(
        logratios[:pairs],
        logratios[pairs:],
        chosen_lengths=lengths[:pairs],
        rejected_lengths=lengths[pairs:],
        normalizer=pairs,
    )
    # float32 on both sides; TRL sums the log-ratios in another order (sequence sums first): rounding only
    torch.testing.assert_close(ours.loss, expected.float(), rtol=1e-5, atol=1e-6)
    for ours_key, trl_key in [
        ("rewards/chosen", "rewards/chosen"),
        ("rewards/rejected", "rewards/rejected"),
        ("rewards/margin", "rewards/margins"),
        ("rewards/accuracy", "rewards/accuracies"),
    ]:
        assert ours.metrics[ours_key].item() == pytest.approx(trl_metrics[trl_key][0], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("seed", [0, 1])
def test_simpo_matches_trl_cpo(label_smoothing, seed):
    trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    logprobs, _, mask = _random_pairs(seed)
    pairs = logprobs.shape[0] // 2
    beta, gamma = 2.0, 0.7
    sums, lengths = sequence_logratios(logprobs, None, mask), mask.sum(-1)
    averages = sums / lengths
    stand_in = SimpleNamespace(
        alpha=0.0,
        accelerator=_Accelerator(),
        loss_type="simpo",
        simpo_gamma=gamma,
        beta=beta,
        label_smoothing=label_smoothing,
    )
    trl_losses, trl_chosen_rewards, _ = trl_cpo.CPOTrainer.cpo_loss(
        stand_in, averages[:pairs], averages[pairs:]
    )
    loss, needs_reference = preference_loss(
        "simpo", beta=beta, label_smoothing=label_smoothing, simpo_gamma=gamma
    )
    assert not needs_reference
    ours = loss(
        sums[:pairs],
        sums[pairs:],
        chosen_lengths=lengths[:pairs],
        rejected_lengths=lengths[pairs:],
        normalizer=pairs,
    )
    # TRL averages log-probabilities before the difference, we divide the summed ones: float32 rounding only
    torch.testing.assert_close(ours.loss, trl_losses.mean(), rtol=1e-5, atol=1e-6)
    assert ours.metrics["rewards/chosen"].item() == pytest.approx(trl_chosen_rewards.mean().item(), rel=1e-5)
