"""The TGDPO anatomy in benchmarks/studies/token_rewards.py splits each pair into its shared prefix, the
first differing token and the rest; checked here on hand-built pairs."""

from __future__ import annotations

import torch

from benchmarks.studies.token_rewards import pair_regions


def test_pair_regions_split_at_the_first_differing_token():
    chosen = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 7, 0, 0]])
    rejected = torch.tensor([[1, 2, 9, 4, 8], [9, 6, 7, 0, 0]])
    chosen_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    rejected_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    regions = pair_regions(chosen, rejected, chosen_mask, rejected_mask)
    as_lists = {name: [side.int().tolist() for side in sides] for name, sides in regions.items()}
    # pair 1 shares "1 2" and differs at position 2; the later equal 4 is not shared (its context
    # differs); pair 2 differs at its first token, and padding belongs to no region
    assert as_lists["shared"] == [[[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]] * 2
    assert as_lists["first"] == [[[0, 0, 1, 0, 0], [1, 0, 0, 0, 0]]] * 2
    assert as_lists["rest"] == [
        [[0, 0, 0, 1, 0], [0, 1, 1, 0, 0]],
        [[0, 0, 0, 1, 1], [0, 1, 1, 0, 0]],
    ]
