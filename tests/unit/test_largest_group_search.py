"""The largest-G search of benchmarks/speed/real_size.py: doubling, where it stops, and which child
failures count as running out of memory (the GPU runs themselves cannot run here)."""

from __future__ import annotations

import pytest

from benchmarks.speed.real_size import largest_fitting, ran_out_of_memory


def test_doubling_stops_at_the_first_group_that_does_not_fit():
    tried = []

    def fits(group):
        tried.append(group)
        return group <= 40

    assert largest_fitting(fits, 8, 256) == (32, 64)
    assert tried == [8, 16, 32, 64]  # nothing past the first failure


def test_every_group_up_to_the_cap_fits():
    assert largest_fitting(lambda group: True, 16, 100) == (64, None)


def test_the_first_group_already_too_large():
    assert largest_fitting(lambda group: False, 16, 256) == (None, 16)


def test_a_start_above_the_cap_is_refused():
    with pytest.raises(ValueError, match="START <= CAP"):
        largest_fitting(lambda group: True, 32, 16)


def test_only_an_out_of_memory_failure_means_too_large():
    assert ran_out_of_memory(0, "") is False
    assert ran_out_of_memory(1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")
    with pytest.raises(RuntimeError, match="another reason"):
        ran_out_of_memory(1, "ValueError: GRPO requires at least 2 generations per prompt")
