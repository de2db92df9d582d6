"""Masked reductions and per-token quantities from logits; torch only.

Masks are bool with True = keep. Masking uses `torch.where`, so NaN or inf at masked positions never
reaches a sum or a gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is True (over `dim`, or everything)."""
    kept = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the True positions; 0 where nothing is kept."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1).to(values.dtype)


def masked_var(
    values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, unbiased: bool = True
) -> torch.Tensor:
    """Variance over the True positions (Bessel-corrected when `unbiased`); 0 for fewer than 2 kept."""
    mean = masked_mean(values, mask, dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    centered = torch.where(mask, values - mean, torch.zeros((), dtype=values.dtype, device=values.device))
    count = (mask.sum() if dim is None else mask.sum(dim)).to(values.dtype)
    denominator = count - 1 if unbiased else count
    var = (centered**2).sum() if dim is None else (centered**2).sum(dim)
    return torch.where(denominator > 0, var / denominator.clamp(min=1), torch.zeros_like(var))


def masked_whiten(
    values: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the kept positions; masked positions become 0.

    With `all_reduce_sum` (a sum over data-parallel ranks) the statistics cover every rank's tokens,
    so the result does not depend on how the batch is split.
    """
    if all_reduce_sum is None:
        mean = masked_mean(values, mask)
        var = masked_var(values, mask, unbiased=False)
    else:
        kept = torch.where(mask, values.double(), torch.zeros((), dtype=torch.float64, device=values.device))
        totals = all_reduce_sum(torch.stack([kept.sum(), (kept**2).sum(), mask.sum().double()]))
        count = totals[2].clamp(min=1)
        mean = (totals[0] / count).to(values.dtype)
        var = (totals[1] / count - (totals[0] / count) ** 2).clamp(min=0).to(values.dtype)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def warp_logits(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sampling distribution's logits: the repetition penalty on the tokens already in the
    context (`seen`, bool [..., V]: see `first_seen_positions`), divide by temperature, then keep
    the top-k, then top-p, then the tokens at least min_p times as likely as the most likely one.

    Same order and tie rules as `transformers` generation and vLLM (penalty, temperature, top-k,
    top-p with at least one token kept), so a logprob pass scores tokens under exactly the
    distribution they were sampled from. Removed tokens get -inf.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling and scoring, got {temperature}")
    logits = logits.float()
    if repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("a repetition penalty needs the tokens seen in each position's context")
        # CTRL's penalty (Keskar et al. 2019), as transformers and vLLM apply it: a seen token's
        # logit is divided by the penalty when positive and multiplied by it when negative
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    logits = logits / temperature if temperature != 1.0 else logits
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, sorted_index, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    if min_p > 0.0:
        probs = logits.softmax(dim=-1)
        remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)  # always keep the most likely
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def first_seen_positions(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """[B, W] where each token id below W (the largest id present, plus one) enters the context of
    a response: -1 for the prompt's tokens (pads excluded), else the response position of its first
    occurrence, else the response length (never). Token v is in the context that predicts response
    token t exactly when the value is < t; `seen_in_context` turns it into a mask for the positions
    in hand (a chunk at a time if need be), so no [B, T, V] tensor is kept."""
    rows, steps = response_ids.shape
    prompt_mask, response_mask = prompt_mask.bool(), response_mask.bool()
    width = 1 + max(
        int(prompt_ids[prompt_mask].max()) if prompt_mask.any() else 0,
        int(response_ids[response_mask].max()) if response_mask.any() else 0,
    )
    first = torch.full((rows, width + 1), steps, dtype=torch.long, device=response_ids.device)
    # tokens outside the masks go to a spare last column, dropped at the end
    response = torch.where(response_mask, response_ids, width)
    positions = torch.arange(steps, device=response_ids.device).expand(rows, steps)
    first.scatter_reduce_(1, response, positions, "amin")
    first.scatter_(1, torch.where(prompt_mask, prompt_ids, width), -1)
    return first[:, :width]


def seen_in_context(first: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, P, vocab_size] True where a token is in the context predicting response token
    `positions` [P] (`first` from `first_seen_positions`; ids beyond its width were never seen)."""
    first = first[:, :vocab_size]
    seen = first[:, None, :] < positions.to(first.device)[None, :, None]
    if first.shape[1] < vocab_size:
        seen = torch.nn.functional.pad(seen, (0, vocab_size - first.shape[1]), value=False)
    return seen


def penalty_context(prompt_ids, prompt_mask, response_ids, response_mask, repetition_penalty: float):
    """`first_seen_positions` when a repetition penalty applies (None otherwise)."""
    if repetition_penalty == 1.0:
        return None
    return first_seen_positions(prompt_ids, prompt_mask, response_ids, response_mask)


def penalty_mask(
    first_seen: torch.Tensor | None, logits: torch.Tensor, start: int = 0
) -> torch.Tensor | None:
    """The context mask for `logits` [B, P, V] predicting response tokens start..start+P-1."""
    if first_seen is None:
        return None
    positions = torch.arange(start, start + logits.shape[1], device=logits.device)
    return seen_in_context(first_seen, positions, logits.shape[-1])


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under softmax(logits), in float32. logits [..., V], tokens [...]."""
    logits = logits.float()
    picked = torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) over the last dim, float32; -inf logits (tokens a sampling warp
    removed) contribute 0 to the value and to the gradient: their -inf logprob is replaced before
    the product, since 0 * -inf would put NaN into the backward even where the value is masked."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    probs = logprobs.exp()
    kept = probs > 0
    terms = probs * torch.where(kept, logprobs, torch.zeros((), device=logits.device))
    return -terms.sum(-1)
