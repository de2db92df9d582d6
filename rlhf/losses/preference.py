"""Preference losses on pairs (chosen, rejected): the reward-model loss and the DPO family.

Bradley-Terry reward model loss (Ouyang et al. arXiv 2203.02155; the margin as in Llama 2,
arXiv 2307.09288):
    l_i = -log sigmoid(r_chosen_i - r_rejected_i - m_i)
`center_coef` adds c * (r_chosen + r_rejected)^2 to keep scores centred near 0 (Eisenstein et al.,
arXiv 2312.09244), as TRL's `center_rewards_coefficient`.

DPO family. Inputs are per-pair sequence log-ratios h = sum_t w_t * (log pi_theta - log pi_ref)(y_t)
of the chosen and rejected responses, [P] each (`sequence_logratios` builds them from per-token
values; the token weights w_t are all 1 for plain DPO, and TGDPO / cDPO change them). With
d = h_chosen - h_rejected:
    sigmoid   DPO (Rafailov et al., arXiv 2305.18290): -log sigmoid(beta d); with label smoothing
              eps it is conservative DPO (Mitchell 2023): -(1-eps) log s(beta d) - eps log s(-beta d)
    ipo       IPO (Azar et al., arXiv 2310.12036, Eq. 17): (d_avg - 1/(2 beta))^2, where each h is
              divided by its token count, as TRL does after confirming it with the IPO authors
    hinge     SLiC (Zhao et al., arXiv 2305.10425): relu(1 - beta d)
    robust    rDPO (Chowdhury et al., arXiv 2403.00409): the unbiased loss under label noise eps,
              ((1-eps) l(d) - eps l(-d)) / (1 - 2 eps) with l(d) = -log sigmoid(beta d)
    simpo     SimPO (Meng et al., arXiv 2405.14734): reference-free,
              -log sigmoid(beta (h_c/|y_c| - h_r/|y_r|) - gamma) with h the summed log pi_theta
All are summed over pairs and divided by the step's pair count (`normalizer`). Metrics follow TRL's
names: implicit rewards beta * h of chosen and rejected, their margin, and the pair accuracy.

Token-level variants (TGDPO, cDPO, T-REG; the weights enter through
`sequence_logratios`):
    tgdpo_token_weights   w_c = 1 + alpha beta r_c, w_r = 1 - alpha beta r_r, r = log(pi_hat/pi_ref)
                          of a frozen DPO model (Zhu et al., TGDPO), floored at `floor`
    cdpo_token_weights    w_r = 1 - s_t from contrastive estimation s_t = softmax((1+b) z_pos -
                          b z_neg)[y_t] (Lin et al., arXiv 2411.19943); chosen weights 1 by default
    token_reward_regularizer and treg_loss
                          T-REG (Zhou et al., arXiv 2412.02685): DPO + alpha * w * (L_reg(y_w) +
                          L_reg(y_l)), L_reg = -sum_t beta r_t log pi_theta(y_t), w = sigmoid(r_l - r_w)
                          with the DPO implicit sequence rewards r, detached
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rlhf.types import LossOutput


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    *,
    normalizer: float | torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> LossOutput:
    """Sum over this micro-batch's pairs of the BT loss, divided by the step's pair count."""
    chosen, rejected = chosen_scores.float(), rejected_scores.float()
    difference = chosen - rejected
    logits = difference - margin.float() if margin is not None else difference
    per_pair = -F.logsigmoid(logits)
    if center_coef:
        per_pair = per_pair + center_coef * (chosen + rejected) ** 2
    metrics = {
        "rm/accuracy": (difference > 0).float().mean().detach(),
        "rm/margin": difference.mean().detach(),
        "rm/chosen_score": chosen.mean().detach(),
        "rm/rejected_score": rejected.mean().detach(),
    }
    return LossOutput(loss=per_pair.sum() / normalizer, metrics=metrics)


def sequence_logratios(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B] sum over valid tokens of w_t * (log pi_theta - log pi_ref); without a reference (SimPO)
    the weighted sum of log pi_theta. Masked positions contribute exactly 0, whatever they hold."""
    # masked before any product: a garbage weight or logprob there would make a NaN gradient
    ratio = logprobs.float() - ref_logprobs.float() if ref_logprobs is not None else logprobs.float()
    ratio = torch.where(mask, ratio, 0.0)
    if weights is not None:
        ratio = ratio * torch.where(mask, weights.float(), 0.0)
    return torch.where(mask, ratio, 0.0).sum(-1)


def _pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }


def _smoothed_logistic(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def dpo_sigmoid_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    normalizer: float | torch.Tensor,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO, -log sigmoid(beta d); conservative DPO when label_smoothing > 0."""
    logits = beta * (chosen_logratios.float() - rejected_logratios.float())
    per_pair = _smoothed_logistic(logits, label_smoothing)
    return LossOutput(per_pair.sum() / normalizer, _pair_metrics(chosen_logratios, rejected_logratios, beta))


def robust_dpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    normalizer: float | torch.Tensor,
    label_smoothing: float,
) -> LossOutput:
    """rDPO: ((1-eps) l(d) - eps l(-d)) / (1 - 2 eps), unbiased for labels flipped with rate eps."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    logits = beta * (chosen_logratios.float() - rejected_logratios.float())
    per_pair = (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing
    )
    return LossOutput(per_pair.sum() / normalizer, _pair_metrics(chosen_logratios, rejected_logratios, beta))


def hinge_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    normalizer: float | torch.Tensor,
) -> LossOutput:
    """SLiC hinge: relu(1 - beta d)."""
    per_pair = torch.relu(1 - beta * (chosen_logratios.float() - rejected_logratios.float()))
    return LossOutput(per_pair.sum() / normalizer, _pair_metrics(chosen_logratios, rejected_logratios, beta))


def ipo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    normalizer: float | torch.Tensor,
) -> LossOutput:
    """IPO on per-token-averaged log-ratios: (h_c/|y_c| - h_r/|y_r| - 1/(2 beta))^2."""
    chosen_average = chosen_logratios.float() / chosen_lengths.float().clamp(min=1)
    rejected_average = rejected_logratios.float() / rejected_lengths.float().clamp(min=1)
    per_pair = (chosen_average - rejected_average - 1 / (2 * beta)) ** 2
    return LossOutput(per_pair.sum() / normalizer, _pair_metrics(chosen_logratios, rejected_logratios, beta))


def simpo_loss(
    chosen_logprobs: torch.Tensor,
    rejected_logprobs: torch.Tensor,
    *,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float,
    normalizer: float | torch.Tensor,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SimPO: -log sigmoid(beta (avg log pi(y_c) - avg log pi(y_r)) - gamma); no reference model.
    Rewards in the metrics are beta * average log-probability, as in the paper."""
    chosen_average = chosen_logprobs.float() / chosen_lengths.float().clamp(min=1)
    rejected_average = rejected_logprobs.float() / rejected_lengths.float().clamp(min=1)
    per_pair = _smoothed_logistic(beta * (chosen_average - rejected_average) - gamma, label_smoothing)
    return LossOutput(per_pair.sum() / normalizer, _pair_metrics(chosen_average, rejected_average, beta))


PairLoss = Callable[..., LossOutput]


PREFERENCE_LOSSES = ("hinge", "ipo", "robust", "sigmoid", "simpo")


def preference_loss(
    name: str, *, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.5
) -> tuple[PairLoss, bool]:
    """The DPO-family loss called `name` with its hyperparameters bound, and whether it needs a
    reference model. The returned function takes (chosen, rejected, *, chosen_lengths,
    rejected_lengths, normalizer); chosen/rejected are log-ratios, or log-probabilities for SimPO."""

    def bind(function: PairLoss, needs_lengths: bool, **hyper) -> PairLoss:
        def loss(chosen, rejected, *, chosen_lengths, rejected_lengths, normalizer):
            lengths = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
            return function(
                chosen, rejected, normalizer=normalizer, **hyper, **(lengths if needs_lengths else {})
            )

        return loss

    losses = {
        "sigmoid": lambda: (bind(dpo_sigmoid_loss, False, beta=beta, label_smoothing=label_smoothing), True),
        "robust": lambda: (bind(robust_dpo_loss, False, beta=beta, label_smoothing=label_smoothing), True),
        "hinge": lambda: (bind(hinge_loss, False, beta=beta), True),
        "ipo": lambda: (bind(ipo_loss, True, beta=beta), True),
        "simpo": lambda: (
            bind(simpo_loss, True, beta=beta, gamma=simpo_gamma, label_smoothing=label_smoothing),
            False,
        ),
    }
    if name not in losses:
        raise ValueError(f"loss.type={name!r} is not a DPO-family loss; choose one of {sorted(losses)}")
    return losses[name]()


def tgdpo_token_weights(
    guide_chosen_logratios: torch.Tensor,
    guide_rejected_logratios: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    floor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """TGDPO token weights from the guide's token rewards r_t = log(pi_hat/pi_ref)(y_t):
    w_c = 1 + alpha * beta * r_t on chosen tokens, w_r = 1 - alpha * beta * r_t on rejected tokens,
    each floored at `floor` (the paper needs w > 0 and has no guard; the floor's hit rate is a
    metric). alpha = 0 gives all-ones weights, i.e. DPO. Masked positions get weight 0."""
    scale = alpha * beta
    raw_chosen = 1 + scale * guide_chosen_logratios.float()
    raw_rejected = 1 - scale * guide_rejected_logratios.float()
    chosen = torch.where(chosen_mask, raw_chosen.clamp(min=floor), 0.0)
    rejected = torch.where(rejected_mask, raw_rejected.clamp(min=floor), 0.0)
    tokens = (chosen_mask.sum() + rejected_mask.sum()).clamp(min=1)
    floored = ((raw_chosen < floor) & chosen_mask).sum() + ((raw_rejected < floor) & rejected_mask).sum()
    metrics = {
        "tgdpo/chosen_weight_mean": chosen.sum() / chosen_mask.sum().clamp(min=1),
        "tgdpo/rejected_weight_mean": rejected.sum() / rejected_mask.sum().clamp(min=1),
        "tgdpo/floor_rate": floored.float() / tokens,
    }
    return chosen.detach(), rejected.detach(), metrics


def contrastive_token_scores(
    positive_logits: torch.Tensor,
    negative_logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    beta: float = 1.0,
) -> torch.Tensor:
    """cDPO contrastive estimation: s_t = softmax((1 + beta) z_pos - beta z_neg)[y_t], [B, T] from
    logits [B, T, V] of the positive and negative models at the positions predicting `token_ids`."""
    logits = (1 + beta) * positive_logits.float() - beta * negative_logits.float()
    return torch.softmax(logits, dim=-1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)


def cdpo_token_weights(
    scores: torch.Tensor, mask: torch.Tensor, *, rejected: bool = True, last_token_weight: float = 1.0
) -> torch.Tensor:
    """cDPO token weights from contrastive-estimation scores s_t: 1 - s_t on a rejected response (a
    token the estimate finds unlikely, a critical token, keeps weight near 1), s_t on a chosen one
    (the non-default `weight_chosen` option). The last valid token (EOS) gets `last_token_weight`
    (1 in the authors' code). Masked positions get 0."""
    weights = 1 - scores.float() if rejected else scores.float()
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = (mask.long().sum(-1, keepdim=True) - 1).clamp(min=0)
    weights = torch.where(positions == last, last_token_weight, weights)
    return torch.where(mask, weights, 0.0).detach()


def contrastive_prompt_token_rewards(
    better_logprobs: torch.Tensor, worse_logprobs: torch.Tensor
) -> torch.Tensor:
    """T-REG token rewards r_t = sigmoid(log pi(y_t | x_better) - log pi(y_t | x_worse)) - 0.5, in
    [-0.5, 0.5], from a frozen model prompted to do better and worse."""
    return torch.sigmoid(better_logprobs.float() - worse_logprobs.float()) - 0.5


def token_reward_regularizer(
    logprobs: torch.Tensor, token_rewards: torch.Tensor, mask: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """[B] T-REG's L_reg(y) = -sum_t beta * r_t * log pi_theta(y_t): a weighted LM loss that raises
    tokens with positive reward and lowers tokens with negative reward."""
    rewards = torch.where(mask, token_rewards.float(), 0.0)  # masked before the product (NaN gradients)
    return -(beta * rewards * torch.where(mask, logprobs.float(), 0.0)).sum(-1)


def treg_loss(
    base: LossOutput,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_regularizer: torch.Tensor,
    rejected_regularizer: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    normalizer: float | torch.Tensor,
) -> LossOutput:
    """T-REG: the DPO-family loss `base` plus alpha * w * (L_reg(y_w) + L_reg(y_l)) per pair, with
    w = sigmoid(beta h_l - beta h_w) detached (large where DPO still ranks the pair wrongly)."""
    weight = torch.sigmoid(beta * (rejected_logratios.float() - chosen_logratios.float())).detach()
    per_pair = weight * (chosen_regularizer + rejected_regularizer)
    metrics = {**base.metrics, "treg/weight": weight.mean(), "treg/regularizer": per_pair.detach().mean()}
    return LossOutput(base.loss + alpha * per_pair.sum() / normalizer, metrics)
