"""Sub-cohort sizing: balanced parts, each able to reach t_honest; fewer parts, or none, when the cohort is short."""

from __future__ import annotations

import pytest

from aggregator.sharding.sub_cohorts import ShardingError, plan_shards, smallest_sub_cohort, split_cohort
from edge_sdk.privacy.noise_floor import expected_count, honest_contributors
from edge_sdk.secagg.errors import SecAggConfigError
from edge_sdk.secagg.parameters import ThreatModel, choose_parameters

IDS = [f"d{i:03d}" for i in range(23)]


def test_parts_are_balanced_disjoint_and_cover_the_cohort():
    parts = split_cohort(list(reversed(IDS)), 4, t_honest=3, colluding=0.05, sub_cohort_min=2)
    assert [len(p) for p in parts] == [6, 6, 6, 5]
    assert sum(parts, ()) == tuple(sorted(IDS))  # sorted, each device exactly once


def test_fewer_parts_when_a_part_could_not_reach_t_honest():
    # a part of s devices keeps s - ceil(0.05 s) honest ones: 5 is the smallest keeping 4
    parts = split_cohort(IDS[:10], 4, t_honest=4, colluding=0.05, sub_cohort_min=2)
    assert [len(p) for p in parts] == [5, 5]
    for part in parts:
        assert len(part) - expected_count(0.05, len(part)) >= 4
    assert split_cohort(IDS[:4], 2, t_honest=4, colluding=0.05, sub_cohort_min=2) == ()
    assert [len(p) for p in split_cohort(IDS, 4, t_honest=1, colluding=0.0, sub_cohort_min=8)] == [12, 11]


def test_plan_shards_calibrates_t_honest_for_the_sub_cohort():
    shard = plan_shards(1000, 4, 2, dropout=0.1, colluding=0.05)
    assert (shard.parts, shard.size) == (4, 250)
    assert shard.t_honest == honest_contributors(250, 0.1, 0.05)
    assert plan_shards(60, 2, 2, 0.1, 0.05).parts == 2
    assert plan_shards(9, 4, 4, 0.0, 0.05).parts == 2  # only as many parts as sub_cohort_min allows
    with pytest.raises(ShardingError, match="below the smallest sub-cohort"):
        plan_shards(3, 2, 4, 0.0, 0.05)
    with pytest.raises(ShardingError, match="at least one worker"):
        plan_shards(100, 0, 2, 0.0, 0.05)


def test_smallest_sub_cohort_is_the_first_size_the_finder_accepts():
    n = smallest_sub_cohort(0.1, 0.05)
    choose_parameters(n, 0.1, 0.05, ThreatModel.ACTIVE)
    assert honest_contributors(n, 0.1, 0.05) >= 1
    smaller_ok = True
    try:
        choose_parameters(n - 1, 0.1, 0.05, ThreatModel.ACTIVE)
    except SecAggConfigError:
        smaller_ok = False
    assert not smaller_ok or honest_contributors(n - 1, 0.1, 0.05) < 1
