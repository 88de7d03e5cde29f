"""How embed sizes its actors' CPU claims and threads for the nodes it finds (a pure function)."""

from __future__ import annotations

import math

import pytest

from m9.stages.embed import plan_resources


@pytest.mark.parametrize(
    ("nodes", "actors", "threads"),
    [
        ([2], 2, 1),  # this machine: one thread per actor
        ([2], 1, 2),  # one actor gets both cores
        ([2], 8, 1),
        ([2, 4, 4], 4, 2),  # EMR defaults: master with 2 Ray CPUs, two core nodes with 4
        ([1, 1, 1], 3, 1),  # the simulated 3-node cluster
        ([16, 16], 4, 8),  # two actors per node, each with half a node
    ],
)
def test_every_actor_fits_on_the_nodes(nodes, actors, threads):
    claim, got_threads = plan_resources(nodes, actors)
    assert sum(math.floor(n / claim + 1e-9) for n in nodes) >= actors
    assert got_threads == threads


def test_the_claim_is_the_largest_that_fits():
    # 10 / 4 = 2.5 would fit only one actor per node; 2.0 fits two on each core node.
    assert plan_resources([2, 4, 4], 4)[0] == 2.0
    assert plan_resources([2], 2)[0] == 1.0
    assert plan_resources([3], 2)[0] == 1.5
