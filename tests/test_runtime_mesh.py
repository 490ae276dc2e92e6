"""Which ranks share each process group, and which data-parallel group each rank serves, on real gloo processes.

The layouts are written out by hand (rank = ((dp * cfg + c) * ring + r) * ulysses + u): a change in how the groups
are built must not move a rank to another group, nor hand a data-parallel group's items to another one.
"""

from __future__ import annotations

import pytest

from tests._dist import rank_context, run_world


def _layout_case(degrees: dict[str, int]) -> dict:
    import torch
    import torch.distributed as dist

    context = rank_context(degrees, num_heads=4)
    axes = {}
    for name, axis in context.axes.items():
        # The group must hold exactly the ranks the axis names, and a collective over it must reach them.
        total = torch.tensor([context.rank])
        dist.all_reduce(total, group=axis.group)
        axes[name] = {
            "ranks": list(axis.ranks),
            "rank": axis.rank,
            "size": axis.size,
            "group_ranks": dist.get_process_group_ranks(axis.group),
            "sum": int(total.item()),
        }
    items = [f"item-{i}" for i in range(10)]
    return {
        "axes": axes,
        "dp_rank": context.dp_rank,
        "dp_size": context.dp_size,
        "is_writer": context.is_writer,
        "items": items[context.dp_rank :: context.dp_size],
    }


SINGLES_8 = [[r] for r in range(8)]
PAIRS_NEXT = [[0, 1], [2, 3], [4, 5], [6, 7]]
PAIRS_2_APART = [[0, 2], [1, 3], [4, 6], [5, 7]]
PAIRS_4_APART = [[0, 4], [1, 5], [2, 6], [3, 7]]
HALVES = [[0, 1, 2, 3], [4, 5, 6, 7]]

LAYOUTS = {
    "dp2 x cfg2 x ulysses2": (
        8,
        {"cfg": 2, "ulysses": 2},
        {"ulysses": PAIRS_NEXT, "ring": SINGLES_8, "sp": PAIRS_NEXT, "cfg": PAIRS_2_APART, "dp": PAIRS_4_APART},
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 4],
    ),
    "cfg2 x ulysses2 x ring2": (
        8,
        {"cfg": 2, "ulysses": 2, "ring": 2},
        {"ulysses": PAIRS_NEXT, "ring": PAIRS_2_APART, "sp": HALVES, "cfg": PAIRS_4_APART, "dp": SINGLES_8},
        [0] * 8,
        [0],
    ),
    "dp2 x ulysses2 x ring2": (
        8,
        {"ulysses": 2, "ring": 2},
        {"ulysses": PAIRS_NEXT, "ring": PAIRS_2_APART, "sp": HALVES, "cfg": SINGLES_8, "dp": PAIRS_4_APART},
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 4],
    ),
    "dp2 x ring2 (ring alone)": (
        4,
        {"ring": 2},
        {
            "ulysses": [[0], [1], [2], [3]],
            "ring": [[0, 1], [2, 3]],
            "sp": [[0, 1], [2, 3]],
            "cfg": [[0], [1], [2], [3]],
            "dp": [[0, 2], [1, 3]],
        },
        [0, 0, 1, 1],
        [0, 2],
    ),
    "ulysses2 (one group is the whole world)": (
        2,
        {"ulysses": 2},
        {"ulysses": [[0, 1]], "ring": [[0], [1]], "sp": [[0, 1]], "cfg": [[0], [1]], "dp": [[0], [1]]},
        [0, 0],
        [0],
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_rank_layout_groups_data_ranks_and_writers(name):
    world, degrees, groups, dp_ranks, writers = LAYOUTS[name]
    results = run_world(world, _layout_case, degrees)
    dp_size = max(dp_ranks) + 1
    items = [f"item-{i}" for i in range(10)]
    for rank, result in enumerate(results):
        assert set(result["axes"]) == set(groups), rank
        for axis, axis_groups in groups.items():
            (mine,) = [g for g in axis_groups if rank in g]
            got = result["axes"][axis]
            assert got["ranks"] == mine, (rank, axis)
            assert got["group_ranks"] == mine, (rank, axis)
            assert (got["rank"], got["size"], got["sum"]) == (mine.index(rank), len(mine), sum(mine)), (rank, axis)
        assert (result["dp_rank"], result["dp_size"]) == (dp_ranks[rank], dp_size), rank
        assert result["items"] == items[dp_ranks[rank] :: dp_size], rank
        assert result["is_writer"] == (rank in writers), rank
