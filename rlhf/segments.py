"""Macro actions (MA-RLHF, arXiv 2410.02743): split each response into token segments, reduce token
rewards and values per segment, and broadcast segment quantities back to tokens.

Every segmenter returns segment ids [B, T] (long): 0, 1, ... in order along each row's valid tokens,
-1 on padding. The last valid token of a row is always a segment of its own (the sequence score sits
there, so it is never averaged away), and no segment is empty, for any batch of mixed lengths.
Boundaries are built per row; the authors' code looked at row 0 only and could emit an empty
segment when the length fit the n-gram grid (spec 1.4, items 3 and 6). `turns` takes each model
turn of a multi-turn episode (rlhf/agents) as one macro action: tool tokens between turns belong
to no segment.
"""

from __future__ import annotations

import random
import re

import torch

AGGREGATIONS = ("mean", "sum", "position", "last")
SEGMENTERS = ("fixed", "randomized", "perplexity", "parse", "turns")


def _ids_from_starts(starts: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Segment ids from a bool [B, T] "a segment starts here" marker; the first valid token, every
    valid token after an invalid one (a multi-turn episode's next turn) and the last valid token
    always start one."""
    mask = response_mask.bool()
    steps = torch.arange(mask.shape[1], device=mask.device)
    # the last trained token (an episode's mask has gaps where tools wrote, so not length - 1);
    # no segment spans a gap: a model turn after a tool result starts a new one
    last = steps[None, :] == torch.where(mask, steps[None, :], -1).max(-1, keepdim=True).values
    after_gap = ~torch.nn.functional.pad(mask[:, :-1], (1, 0), value=False)
    starts = (starts | after_gap | last) & mask
    ids = starts.long().cumsum(1) - 1
    return torch.where(mask, ids, torch.full_like(ids, -1))


def fixed_ngram_segments(response_mask: torch.Tensor, n: int = 5) -> torch.Tensor:
    """Segments of n tokens; the last token alone (so the one before it may be shorter)."""
    if n < 1:
        raise ValueError(f"macro.n must be at least 1, got {n}")
    steps = torch.arange(response_mask.shape[1], device=response_mask.device)
    return _ids_from_starts((steps % n == 0)[None, :].expand_as(response_mask), response_mask)


def turn_segments(response_mask: torch.Tensor) -> torch.Tensor:
    """Each model turn of a multi-turn episode one segment (the last token alone, as everywhere):
    a turn starts at the first trained token and wherever one follows tokens a tool wrote. A
    single-turn response is one segment and its last token."""
    return _ids_from_starts(torch.zeros_like(response_mask, dtype=torch.bool), response_mask)


def randomized_ngram_segments(
    response_mask: torch.Tensor,
    lengths: tuple[int, ...] = (1, 2, 3, 5, 10),
    repeat_times: int = 3,
    generator: random.Random | None = None,
) -> torch.Tensor:
    """Per row, segment lengths drawn by shuffling `lengths` x `repeat_times` (the authors' list,
    length 1 included) and consuming them in order; once used up, the rest but the last token is one
    segment (the "infinite" macro action)."""
    rng = generator or random.Random(0)
    starts = torch.zeros_like(response_mask, dtype=torch.bool)
    for row, length in enumerate(response_mask.sum(1).tolist()):
        plan = list(lengths) * repeat_times
        rng.shuffle(plan)
        position = 0
        for size in plan:
            if position >= length - 1:
                break
            starts[row, position] = True
            position += size
        if position < length - 1:
            starts[row, position] = True  # the tail up to the last token
    return _ids_from_starts(starts, response_mask)


def perplexity_segments(ref_logprobs: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """A new segment at token t when the next token is more surprising to the reference model than
    token t (ppl_{t+1} > ppl_t, ppl = exp(-log pi_ref)), as the authors' rule places the boundary.
    Comparing log-probabilities is the same test: -log p_{t+1} > -log p_t."""
    surprise = -ref_logprobs.float()
    starts = torch.zeros_like(response_mask, dtype=torch.bool)
    starts[:, :-1] = surprise[:, 1:] > surprise[:, :-1]
    return _ids_from_starts(starts, response_mask)


PROSE_BOUNDARY = re.compile(r"[.!?;:,]\s*$|\n")
CODE_BOUNDARY = re.compile(r"[;{}:]\s*$|\n")


def parse_segments(
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    token_texts: list[str],
    style: str = "prose",
    max_length: int = 5,
) -> torch.Tensor:
    """Rule-based parse (no parser download): a segment ends after a token that closes a clause or
    sentence (prose: , ; : . ! ? or a newline) or a statement or line (code: ; { } : or a newline);
    spans longer than `max_length` tokens are cut every `max_length` (the authors' parse cutoff C).
    `token_texts[id]` is the decoded text of each vocabulary id."""
    if style not in ("prose", "code"):
        raise ValueError(f"macro.parse_style={style!r}; choose prose or code")
    if max_length < 1:
        raise ValueError(f"macro.parse_max_length must be at least 1, got {max_length}")
    pattern = PROSE_BOUNDARY if style == "prose" else CODE_BOUNDARY
    closes = torch.tensor([bool(pattern.search(text)) for text in token_texts], device=response_ids.device)
    ends = closes[response_ids.clamp(0, len(token_texts) - 1)] & response_mask.bool()
    starts = torch.zeros_like(ends)
    starts[:, 1:] = ends[:, :-1]
    # cut long spans: count tokens since the last start, row by row over T (vectorised over rows)
    since = torch.zeros(response_ids.shape[0], dtype=torch.long, device=response_ids.device)
    for t in range(response_ids.shape[1]):
        since = torch.where(starts[:, t], torch.zeros_like(since), since)
        cut = (since >= max_length) & ~starts[:, t]
        starts[:, t] |= cut
        since = torch.where(cut, torch.zeros_like(since), since) + 1
    return _ids_from_starts(starts, response_mask)


def token_texts_of(tokenizer) -> list[str]:
    """Decoded text of every id, for `parse_segments`."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def num_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B] segments per row."""
    return segment_ids.max(1).values + 1


def segment_reduce(values: torch.Tensor, segment_ids: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """[B, K] per-segment reduction of token values [B, T] (K = most segments in a row; padding 0).

    mean: the authors' code ("equal" weights); sum: the paper's macro reward; position: weights
    1/(i+1) normalised, i the index inside the segment (the first token weighs most, as the code
    does); last: the segment's last token (the "unit" weighting the released code meant)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"macro.aggregation={how!r}; choose one of {list(AGGREGATIONS)}")
    valid = segment_ids >= 0
    rows, width = segment_ids.shape
    k = int(segment_ids.max()) + 1 if valid.any() else 1
    index = torch.where(valid, segment_ids, torch.zeros_like(segment_ids))
    values = torch.where(valid, values.float(), torch.zeros_like(values, dtype=torch.float32))

    def per_segment(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(rows, k, dtype=torch.float32, device=x.device).scatter_add(1, index, x)

    counts = per_segment(valid.float())
    if how == "sum":
        return per_segment(values)
    if how == "mean":
        return per_segment(values) / counts.clamp(min=1)
    # index inside the segment: position minus the segment's first position
    steps = torch.arange(width, device=segment_ids.device).expand(rows, -1)
    first = torch.full((rows, k), width, dtype=torch.long, device=segment_ids.device)
    first = first.scatter_reduce(1, index, torch.where(valid, steps, torch.full_like(steps, width)), "amin")
    inside = steps - first.gather(1, index)
    if how == "position":
        weights = torch.where(valid, 1.0 / (inside + 1).float(), torch.zeros_like(values))
        return per_segment(weights * values) / per_segment(weights).clamp(min=1e-12)
    is_last = valid & (inside + 1 == counts.gather(1, index).long())
    return per_segment(torch.where(is_last, values, torch.zeros_like(values)))


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, K] True for the segments a row has (a True-prefix mask, like a response mask)."""
    k = int(segment_ids.max()) + 1 if (segment_ids >= 0).any() else 1
    return torch.arange(k, device=segment_ids.device)[None, :] < num_segments(segment_ids)[:, None]


def broadcast_to_tokens(per_segment: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] each token's segment value; 0 on padding."""
    index = segment_ids.clamp(min=0)
    out = per_segment.gather(1, index)
    return torch.where(segment_ids >= 0, out, torch.zeros_like(out))


def make_segmenter(cfg, tokenizer, seed: int = 0):
    """(batch, key) -> segment ids [B, T] for `advantage.macro` (a MacroConfig), or None for
    token-level PPO; `key` (step and rank) seeds the randomized lengths, so a resumed run draws the
    same ones. Checks the options up front so that a typo fails before any training."""
    if cfg.segmenter == "none":
        return None
    if cfg.segmenter not in SEGMENTERS:
        raise ValueError(
            f"advantage.macro.segmenter={cfg.segmenter!r}; choose none or one of {list(SEGMENTERS)}"
        )
    for field_name in ("aggregation", "reward_aggregation"):
        value = getattr(cfg, field_name)
        if value is not None and value not in AGGREGATIONS:
            raise ValueError(f"advantage.macro.{field_name}={value!r}; choose one of {list(AGGREGATIONS)}")
    if cfg.ratio not in ("token", "macro"):
        raise ValueError(f"advantage.macro.ratio={cfg.ratio!r}; choose token or macro")
    if cfg.segmenter == "fixed":
        fixed_ngram_segments(torch.ones(1, 1, dtype=torch.bool), cfg.n)  # validates n
        return lambda batch, key: fixed_ngram_segments(batch.response_mask, cfg.n)
    if cfg.segmenter == "randomized":
        if not cfg.random_lengths or min(cfg.random_lengths) < 1 or cfg.random_repeats < 1:
            raise ValueError("advantage.macro.random_lengths must be positive and random_repeats >= 1")
        return lambda batch, key: randomized_ngram_segments(
            batch.response_mask, tuple(cfg.random_lengths), cfg.random_repeats, random.Random(f"{seed}/{key}")
        )
    if cfg.segmenter == "turns":
        return lambda batch, key: turn_segments(batch.response_mask)
    if cfg.segmenter == "perplexity":
        return lambda batch, key: perplexity_segments(batch.ref_logprobs, batch.response_mask)
    texts = token_texts_of(tokenizer)
    parse_segments(
        torch.zeros(1, 1, dtype=torch.long),
        torch.ones(1, 1, dtype=torch.bool),
        texts,
        cfg.parse_style,
        cfg.parse_max_length,
    )
    return lambda batch, key: parse_segments(
        batch.response_ids, batch.response_mask, texts, cfg.parse_style, cfg.parse_max_length
    )


def macro_ratio_logprobs(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, segment_ids: torch.Tensor
) -> torch.Tensor:
    """Per-token logprobs whose ratio to `old_logprobs` is the segment's product ratio
    (the paper's MA-PPO ratio): old + sum over the segment of (new - old), broadcast to its tokens.
    Gradients reach every token of the segment."""
    summed = segment_reduce(logprobs - old_logprobs, segment_ids, "sum")
    return old_logprobs + broadcast_to_tokens(summed, segment_ids)
