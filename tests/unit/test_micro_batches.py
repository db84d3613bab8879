"""Micro-batches by token budget (learner/micro_batches.py); the update they give: tests/unit/test_update.py."""

import mlx.core as mx
import numpy as np
import pytest

from common.logprobs import round_up
from learner.micro_batches import (
    MicroBatching,
    activation_bytes_per_token,
    free_device_memory,
    plan_micro_batches,
    resolve_token_budget,
    token_budget_groups,
)
from tests.unit.test_update import _mixed_lengths


@pytest.mark.parametrize("seed", range(5))
def test_token_budget_groups_cover_every_row_once_fill_to_the_budget_and_no_further(seed):
    rng = np.random.default_rng(seed)
    lengths = np.sort(rng.integers(1, 400, 50))
    rows = rng.permutation(50)  # any row ids, in the order of their (sorted) lengths
    budget, multiple = 512, 32
    groups = token_budget_groups(rows, lengths, budget, multiple)
    assert np.array_equal(np.concatenate(groups), rows)
    start = 0
    for group in groups:
        longest = round_up(lengths[start + len(group) - 1], multiple)
        assert len(group) == 1 or len(group) * longest <= budget
        if start + len(group) < len(rows):  # one more row would not have fit
            assert (len(group) + 1) * round_up(lengths[start + len(group)], multiple) > budget
        start += len(group)


def test_a_sequence_longer_than_the_budget_goes_alone():
    groups = token_budget_groups(np.arange(4), np.array([10, 20, 300, 310]), budget=256, multiple=32)
    assert [g.tolist() for g in groups] == [[0, 1], [2], [3]]


def test_micro_batching_sorts_by_length_and_packs_short_sequences_together():
    arrays = _mixed_lengths().padded(pad_multiple=32)  # lengths 5, 110, 8, 8, 65, 70, 13, 8
    by_budget = MicroBatching(size=8, token_budget=96, multiple=32)(arrays, np.arange(8))
    assert [g.tolist() for g in by_budget] == [[0, 2, 3], [7, 6], [4], [5], [1]]
    fixed = MicroBatching(size=2, token_budget=0, multiple=32)(arrays, np.arange(8))
    assert [g.tolist() for g in fixed] == [[0, 2], [3, 7], [6, 4], [5, 1]]
    assert plan_micro_batches(np.arange(5), np.ones(5), 2, 0, 32)[-1].tolist() == [4]


def test_the_automatic_budget_is_off_on_the_cpu_and_a_given_one_is_kept():
    assert mx.default_device() == mx.cpu
    assert resolve_token_budget(-1, None, mx.float32) == 0
    assert resolve_token_budget(0, None, mx.float32) == 0
    assert resolve_token_budget(4096, None, mx.float32) == 4096


class _Args:
    def __init__(self, hidden_size, intermediate_size, num_hidden_layers, vocab_size=49152):
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_hidden_layers, self.vocab_size = num_hidden_layers, vocab_size


def test_the_memory_estimate_is_within_the_peaks_measured_on_a_gpu():
    """The H200's bf16 peaks between 8k- and 32k-token micro-batches (bench/results/h200-warmup.md): 1.59 MB a
    token on SmolLM2-135M, 3.99 MB on the 1.7B shape. The estimate must not fall below them by more than 5%."""
    small = activation_bytes_per_token(_Args(576, 1536, 30), 2)
    large = activation_bytes_per_token(_Args(2048, 8192, 24), 2)
    assert 0.95 * 1.59e6 <= small <= 1.3 * 1.59e6
    assert 0.95 * 3.99e6 <= large <= 1.3 * 3.99e6


def test_free_memory_is_read_from_what_cuda_and_metal_report():
    """The names MLX 0.32 gives: CUDA's ``free_memory`` (seen on the H200), Metal's recommended working set."""
    cuda = {"total_memory": 150754820096, "free_memory": 149557477376, "device_name": "NVIDIA H200"}
    assert free_device_memory(cuda) == 149557477376
    metal = {"max_recommended_working_set_size": 100 * 2**30, "memory_size": 128 * 2**30}
    assert 99 * 2**30 < free_device_memory(metal) <= 100 * 2**30
    assert free_device_memory({"architecture": "x86_64", "device_name": "AMD EPYC"}) == 0


def test_a_shared_device_is_split_between_learners_and_actors():
    """The launcher's 'learners,actors' share: parts that add up to the device, alone or malformed = whole."""
    from common.device_share import LEARNER_PART, memory_part, share_env

    share = share_env(1, 2)["MLX_PPO_DEVICE_SHARE"]
    assert memory_part("learner", share) == LEARNER_PART
    assert memory_part("actor", share) == pytest.approx((1 - LEARNER_PART) / 2)
    two_ranks = share_env(2, 4)["MLX_PPO_DEVICE_SHARE"]
    parts = 2 * memory_part("learner", two_ranks) + 4 * memory_part("actor", two_ranks)
    assert parts == pytest.approx(1.0)
    assert memory_part("learner", None) == memory_part("actor", "1,0") == memory_part("actor", "x") == 1.0


def test_the_limits_on_a_shared_device_leave_room_for_what_mlx_does_not_count():
    """The limits add up to SHARED_USABLE of the device, not all of it: at 100% (1 learner + 2 actors on one
    H200) the learner ran out of memory, each process's CUDA context and libraries' workspaces being outside them."""
    from common.device_share import SHARED_USABLE, memory_part, share_env, shared_limit

    total = 150_754_820_096  # an H200 as MLX reports it
    share = share_env(1, 2)["MLX_PPO_DEVICE_SHARE"]
    limits = [shared_limit(memory_part(r, share), total) for r in ("learner", "actor", "actor")]
    assert sum(limits) <= SHARED_USABLE * total
    assert total - sum(limits) >= 3 * 5 * 10**9  # >= 5 GB a process outside the limits
    assert limits[0] > limits[1] == limits[2] > 0


def test_a_shared_limit_sizes_the_automatic_budget_from_the_learners_part():
    """With the device shared, the budget comes from the learner's limit, not from the whole free device."""
    from learner.micro_batches import SHARED_PART_FRACTION, budget_memory

    free = 140 * 2**30
    assert budget_memory(free, 0)[0] == free
    limit = 80 * 2**30
    memory, fraction = budget_memory(free, limit)
    assert memory <= limit and memory < free and fraction == SHARED_PART_FRACTION
