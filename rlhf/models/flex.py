"""FlexAttention for the packed layouts (`model.attn_implementation=flex_attention`): shared-prefix
groups (rlhf.models.shared_prefix) and padding-free bins (rlhf.models.forward.PackedRows) attend
through one FlexAttention call per layer with a block-sparse mask, instead of SDPA with a dense
mask (quadratic in the packed length, no fused kernel) or a gather of each group's prefix.

A packed batch [B, W] is described per token: its packed row, its segment (0: a shared prompt,
k > 0: the k-th row's own tokens, -1: padding) and its position. A query attends a key at or
before its column, in its packed row, that is a prompt token or a token of its own segment, and
with a sliding window only keys less than `window` positions before its own: exactly what each row
sees alone. The batch is flattened to one sequence whose length is rounded up to a bucket
(`bucket_length`: multiples of 128 in quarter-octave steps), so the kernel, compiled once per
bucket with static shapes, is reused across steps and batch shapes; blocks past the end are masked
and skipped. The block mask is built once per batch and window, and shared by every layer.

torch's FlexAttention has no backward on CPU, so on CPU this path serves forward passes only (the
training engine refuses it, rlhf.distributed.engine); its compiled kernels run on CPU, which is
where the test suite checks that every layout gives the per-row values.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from rlhf.config.checks import ConfigError

FLEX_BLOCK = 128  # FlexAttention's default block size


def bucket_length(length: int) -> int:
    """`length` rounded up to a multiple of FLEX_BLOCK in steps of an eighth of the next power of
    two: less than a block or a quarter of `length` added, and four sizes per doubling, so a run
    compiles few shapes."""
    ceiling = FLEX_BLOCK
    while ceiling < length:
        ceiling *= 2
    step = max(FLEX_BLOCK, ceiling // 8)
    return -(-length // step) * step


@dataclass
class FlexDocuments:
    """Per-token row, segment and position of a packed batch [batch, width], flattened and padded
    to `bucket_length(batch * width)` (padding: row and segment -1)."""

    row: torch.Tensor  # [L]
    segment: torch.Tensor  # [L]
    position: torch.Tensor  # [L]
    batch: int
    width: int
    masks: dict = field(default_factory=dict, repr=False)  # block masks by sliding window

    @classmethod
    def from_packed(cls, segment_ids: torch.Tensor, position_ids: torch.Tensor) -> FlexDocuments:
        batch, width = segment_ids.shape
        padding = bucket_length(batch * width) - batch * width
        rows = torch.arange(batch, device=segment_ids.device)[:, None].expand(batch, width)
        rows = torch.where(segment_ids >= 0, rows, -1)

        def flat(values: torch.Tensor, fill: int) -> torch.Tensor:
            return torch.nn.functional.pad(values.reshape(-1), (0, padding), value=fill)

        return cls(flat(rows, -1), flat(segment_ids, -1), flat(position_ids, 0), batch, width)

    @property
    def length(self) -> int:
        return self.row.shape[0]

    def block_mask(self, window: int | None):
        if window not in self.masks:
            from torch.nn.attention.flex_attention import create_block_mask

            row, segment, position = self.row, self.segment, self.position

            def mask_mod(batch, head, query, key):
                key_segment = segment[key]
                allowed = (key <= query) & (key_segment >= 0) & (row[key] == row[query])
                allowed = allowed & ((key_segment == 0) | (key_segment == segment[query]))
                if window:
                    allowed = allowed & (position[query] - position[key] < window)
                return allowed

            self.masks[window] = create_block_mask(
                mask_mod, 1, None, self.length, self.length, device=row.device, _compile=True
            )
        return self.masks[window]


@functools.cache
def compiled_flex_attention():
    """torch's flex_attention compiled with static shapes (one kernel per bucket; dynamic-shape
    kernels fail to build on CPU in torch 2.13), with room for a run's buckets in dynamo's cache."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False)


def packed_flex_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    documents: FlexDocuments,
    window: int | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **_: object,
) -> torch.Tensor:
    """Attention of a packed batch, [B, H, W, D] in (keys and values may have fewer heads: GQA) and
    [B, W, H, D] out (transformers' layout), in one FlexAttention call."""
    if dropout:
        raise ValueError("flex_attention on packed rows does not support attention dropout")
    batch, heads, width, dim = query.shape
    tokens = batch * width

    def flat(states: torch.Tensor) -> torch.Tensor:  # [B, h, W, D] -> [1, h, L, D]
        merged = states.transpose(0, 1).reshape(states.shape[1], tokens, dim)
        return torch.nn.functional.pad(merged, (0, 0, 0, documents.length - tokens))[None]

    out = compiled_flex_attention()(
        flat(query),
        flat(key),
        flat(value),
        block_mask=documents.block_mask(window),
        scale=scaling,
        enable_gqa=key.shape[1] != heads,
    )
    return out[0, :, :tokens].reshape(heads, batch, width, dim).permute(1, 2, 0, 3)


def refuse_training_on_cpu(model: torch.nn.Module, device: torch.device | str) -> None:
    """A model to train on CPU cannot use FlexAttention: torch has no FlexAttention backward there."""
    name = getattr(getattr(model, "config", None), "_attn_implementation", None) or ""
    if "flex" in name and torch.device(device).type == "cpu":
        raise ConfigError(
            "model.attn_implementation=flex_attention trains on CUDA only (torch has no FlexAttention "
            "backward on CPU); use sdpa on CPU"
        )
