"""Per-token values of frozen models over a pair dataset, computed once and kept on disk.

DPO-family recipes need, for every pair, per-token values that never change during training:
reference logprobs, a TGDPO guide's logprobs, cDPO contrastive scores, T-REG token rewards. With
`reference.precompute` they are computed in one pass before training (TRL's
`precompute_ref_log_probs`, but per token, which the token-level methods need) and the frozen models
can be dropped. The cache is a directory named by a key of everything that determines the values;
a second run with the same key reads it instead of computing.

Layout: `<dir>/<key>/shard-RRRRR-of-WWWWW.pt` (each rank's contiguous share of the rows: every value
column as one flat float32 tensor plus row offsets) and `complete.json`, written last, so a crash
mid-way leaves no cache that looks finished. Values are stored only at valid tokens of each row.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from typing import Any

import torch

TokenValues = dict[str, list[torch.Tensor]]  # column -> one 1-D float tensor per row


def token_cache_key(**parts: Any) -> str:
    """A short stable hash of everything that determines the cached values."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _save_shard(path: str, values: TokenValues) -> None:
    packed = {}
    for name, rows in values.items():
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        packed[name] = {
            "flat": torch.cat(rows) if rows else torch.zeros(0),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]),
        }
    temporary = path + ".tmp"
    torch.save(packed, temporary)
    os.replace(temporary, path)


def _load_shard(path: str) -> TokenValues:
    packed = torch.load(path, weights_only=True)
    return {
        name: [
            entry["flat"][a:b] for a, b in zip(entry["offsets"][:-1].tolist(), entry["offsets"][1:].tolist())
        ]
        for name, entry in packed.items()
    }


def cached_token_values(
    num_rows: int,
    compute: Callable[[list[int]], TokenValues],
    *,
    directory: str,
    engine: Any,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> TokenValues:
    """Every row's token values: read from `directory` if a complete cache is there, otherwise
    computed with `compute(row_indices)` (each rank its contiguous shard, all ranks the same number
    of calls so that ZeRO-3's collective forwards stay in step) and written there."""
    marker = os.path.join(directory, "complete.json")
    if not os.path.exists(marker):
        shard = math.ceil(num_rows / engine.world_size)
        start, stop = engine.rank * shard, min((engine.rank + 1) * shard, num_rows)
        mine: TokenValues = {}
        for offset in range(0, shard, batch_size):
            indices = list(range(start + offset, min(start + offset + batch_size, stop)))
            values = compute(indices or [0])  # an empty share still joins the collective forward
            if indices:
                for name, rows in values.items():
                    mine.setdefault(name, []).extend(rows)
            done = min(offset + batch_size, shard)
            if progress is not None and engine.is_main and (done == shard or done // batch_size % 20 == 0):
                progress(done, shard)
        os.makedirs(directory, exist_ok=True)
        _save_shard(os.path.join(directory, f"shard-{engine.rank:05d}-of-{engine.world_size:05d}.pt"), mine)
        engine.barrier()
        if engine.is_main:
            with open(marker + ".tmp", "w") as handle:
                json.dump({"rows": num_rows, "world_size": engine.world_size}, handle)
            os.replace(marker + ".tmp", marker)
        engine.barrier()
    with open(marker) as handle:
        meta = json.load(handle)
    if meta["rows"] != num_rows:
        raise ValueError(
            f"token cache {directory} holds {meta['rows']} rows, the data has {num_rows}: delete it"
        )
    merged: TokenValues = {}
    for rank in range(meta["world_size"]):
        for name, rows in _load_shard(
            os.path.join(directory, f"shard-{rank:05d}-of-{meta['world_size']:05d}.pt")
        ).items():
            merged.setdefault(name, []).extend(rows)
    return merged


def pad_token_values(
    rows: list[torch.Tensor], mask: torch.Tensor, *, column: str, row_ids: list[int] | None = None
) -> torch.Tensor:
    """[B, T] tensor of per-row values placed at the valid positions of `mask` (right padding);
    a row whose length differs from its mask names the column and the row (a stale cache)."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    lengths = mask.sum(-1).tolist()
    for index, (values, length) in enumerate(zip(rows, lengths)):
        if len(values) != length:
            row = row_ids[index] if row_ids is not None else index
            raise ValueError(
                f"cached token values '{column}' for row {row} have {len(values)} tokens, the tokenized "
                f"completion has {length}: the cache was made with another tokenizer or data; delete it"
            )
        out[index, :length] = values.to(out.device)
    return out
