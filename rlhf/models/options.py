"""Forward options: how a logprob, value or reward pass lays out its rows and warps its logits, as
one explicit object built once from the config and handed to every pass (rlhf/models/forward.py).

- `shared_prefix`: rows that repeat a prompt are packed so the prompt is encoded once (Prefix
  Grouper). The model must be loaded with `model.shared_prefix=true` (its attention takes the
  packed layout); a pass asked for it on any other model raises instead of attending across rows.
- `padding_free`: rows go through the model packed, their valid tokens only.
- `logprob_chunk_tokens`: the LM head, warp, log-softmax and gather this many response tokens at a
  time, so the [rows, tokens, vocabulary] logits never exist at once. None (the default) chooses
  by size: whole when the pass's fp32 logits would be at most `AUTO_LOGITS_BYTES`, else chunks of
  at most `AUTO_CHUNK_BYTES` of logits each (at a 152k vocabulary, a 4-row pass of 1,536 tokens
  has 3.7 GB of logits and takes chunks of 110 tokens); 0 never chunks. Chunks are used only for
  the families whose logits are the LM head's output as it is (`CHUNKABLE_FAMILIES`).
- `warp`: the sampling warp (temperature, top-k, top-p, min-p, repetition penalty), applied
  exactly as in sampling, so log pi(a_t) is the probability of the distribution a_t was drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

CHUNKABLE_FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3")
AUTO_LOGITS_BYTES = 512 * 2**20
AUTO_CHUNK_BYTES = 256 * 2**20
MIN_AUTO_CHUNK = 16


@dataclass(frozen=True)
class ForwardOptions:
    shared_prefix: bool = False
    padding_free: bool = False
    logprob_chunk_tokens: int | None = None
    warp: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, model_cfg: Any, warp: dict[str, float] | None = None) -> ForwardOptions:
        """The options of a model loaded from `model_cfg` (model.shared_prefix, padding_free,
        logprob_chunk_tokens), with the sampling `warp` of its logprob passes."""
        return cls(
            shared_prefix=model_cfg.shared_prefix,
            padding_free=model_cfg.padding_free,
            logprob_chunk_tokens=model_cfg.logprob_chunk_tokens,
            warp=dict(warp or {}),
        )

    def with_warp(self, warp: dict[str, float]) -> ForwardOptions:
        return replace(self, warp=dict(warp))

    def chunk_tokens(self, rows: int, tokens: int, vocab: int, config: Any) -> int:
        """The chunk this pass uses (0: whole), for `rows` x `tokens` response positions over a
        vocabulary of `vocab`; `config` is the model's (its family decides whether chunks apply)."""
        if self.logprob_chunk_tokens is not None:
            return self.logprob_chunk_tokens
        if not chunkable(config) or rows * tokens * vocab * 4 <= AUTO_LOGITS_BYTES:
            return 0
        return max(MIN_AUTO_CHUNK, AUTO_CHUNK_BYTES // (rows * vocab * 4))


DEFAULT = ForwardOptions()


def chunkable(config: Any) -> bool:
    """Whether a model's logits are its LM head's output as it is (no soft-capping), so the chunked
    pass may apply the head itself."""
    family = getattr(config, "model_type", None)
    return family in CHUNKABLE_FAMILIES and not getattr(config, "final_logit_softcapping", None)
