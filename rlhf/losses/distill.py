"""Token-level policy distillation: AlignDistil (Zhang et al. 2025, arXiv 2503.02832; the authors'
code: the aligndistil off-policy trainer).

RLHF with the DPO token reward, max E[sum_t beta log(pi_dpo / pi_ref)] - beta2 KL(pi || pi_ref), has
the per-token optimum pi*(t) proportional to exp((1 - beta/beta2) z_ref + (beta/beta2) z_dpo), so it
is distillation toward pi* with the token-level reverse KL, scaled. Per response token t:
    loss_t = (beta / w_t) * KL(pi_theta(.|t) || softmax(z*_t / temperature))
with the teacher z*_t of a registered variant (`DISTILL_TEACHERS`):
- aligndistil (the authors' default): the contrast of a DPO model (z) and a reverse-DPO model
  (z_bar, trained with chosen and rejected swapped), extrapolated token-adaptively:
      w_t = beta2 * TVD_t + floor,  TVD_t = sum_v |p_dpo(v) - p_rdpo(v)|  (not halved, as coded)
      z*_t = z_t + w_t (z_t - z_bar_t)
- theorem1: the fixed interpolation w = beta / beta2, z* = w z_dpo + (1 - w) z_ref (loss scale beta2).
Vocabularies are cut to the smallest of the models' logit widths (the authors' code does the same
for Qwen's padded heads). All in float32. Each function takes logits [..., V] of one chunk of
tokens; `rlhf.models.forward.chunked_token_loss` calls them a chunk at a time so the full
[rows, tokens, vocab] tensors never exist.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _common_vocab(*logits: torch.Tensor) -> list[torch.Tensor]:
    width = min(x.shape[-1] for x in logits)
    return [x[..., :width].float() for x in logits]


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_student || p_teacher) over the last dimension, [...]: sum_v p_s (log p_s - log p_t)."""
    student = torch.log_softmax(student_logits.float(), dim=-1)
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (student.exp() * (student - teacher)).sum(-1)


def aligndistil_teacher(
    dpo_logits: torch.Tensor, other_logits: torch.Tensor, *, beta: float, beta2: float, floor: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher logits z*, loss scale beta / w_t) from the DPO and reverse-DPO logits."""
    dpo, reverse = _common_vocab(dpo_logits, other_logits)
    tvd = (torch.softmax(dpo, -1) - torch.softmax(reverse, -1)).abs().sum(-1)
    weight = beta2 * tvd + floor
    return dpo + weight.unsqueeze(-1) * (dpo - reverse), beta / weight


def theorem1_teacher(
    dpo_logits: torch.Tensor, other_logits: torch.Tensor, *, beta: float, beta2: float, floor: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher logits w z_dpo + (1 - w) z_ref with w = beta / beta2, loss scale beta2); `other` is
    the reference model's logits here."""
    dpo, reference = _common_vocab(dpo_logits, other_logits)
    weight = beta / beta2
    scale = torch.full(dpo.shape[:-1], beta2, dtype=torch.float32, device=dpo.device)
    return weight * dpo + (1 - weight) * reference, scale


DISTILL_TEACHERS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "aligndistil": aligndistil_teacher,
    "theorem1": theorem1_teacher,
}


def get_distill_teacher(name: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    if name not in DISTILL_TEACHERS:
        raise ValueError(f"loss.variant={name!r} is not one of {sorted(DISTILL_TEACHERS)}")
    return DISTILL_TEACHERS[name]


def distill_token_loss(
    student_logits: torch.Tensor,
    dpo_logits: torch.Tensor,
    other_logits: torch.Tensor,
    *,
    teacher: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    beta: float,
    beta2: float,
    temperature: float = 1.0,
    floor: float = 1e-3,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token (beta / w_t) KL(pi_theta || pi*) [...] for one chunk, and per-token statistics
    (the teacher's scale and the KL) to be averaged by the caller. Teacher terms carry no gradient."""
    student, dpo, other = _common_vocab(student_logits, dpo_logits, other_logits)
    with torch.no_grad():
        target, scale = teacher(dpo, other, beta=beta, beta2=beta2, floor=floor)
        target = target / temperature
    kl = reverse_kl(student, target)
    return scale * kl, {"distill/kl": kl.detach(), "distill/scale": scale}
