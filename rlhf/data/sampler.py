"""A seeded, resumable index sampler: a fresh permutation per epoch, batches that cross epochs.

Its state is (epoch, offset), saved in checkpoints, so a resumed run draws exactly the rows an
uninterrupted run would have drawn, epoch boundaries included.
"""

from __future__ import annotations

import torch


class EpochSampler:
    def __init__(self, num_rows: int, seed: int = 0):
        if num_rows < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.num_rows = num_rows
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def next_indices(self, count: int) -> list[int]:
        picked: list[int] = []
        while len(picked) < count:
            if self.offset == self.num_rows:
                self.epoch += 1
                self.offset = 0
                self._order = self._permutation(self.epoch)
            take = min(count - len(picked), self.num_rows - self.offset)
            picked.extend(self._order[self.offset : self.offset + take])
            self.offset += take
        return picked

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "num_rows": self.num_rows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_rows"] != self.num_rows:
            raise ValueError(
                f"checkpoint sampler saw {state['num_rows']} rows but the dataset now has {self.num_rows}"
            )
        self.seed = state["seed"]
        self.epoch = state["epoch"]
        self.offset = state["offset"]
        self._order = self._permutation(self.epoch)


def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch of row indices (groups stay whole)."""
    per_rank = len(indices) // world_size
    return indices[rank * per_rank : (rank + 1) * per_rank]
