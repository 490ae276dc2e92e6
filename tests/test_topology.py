"""Degree selection and the pre-load shape checks (pure Python, no torch)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from batchgen.core.errors import EXIT_PARALLEL, TopologyError
from batchgen.core.topology import (
    MESH_DIMS,
    Topology,
    check_items,
    choose_topology,
    visual_tokens,
    working_layouts,
)


@dataclass
class Shape:
    id: str
    num_frames: int
    height: int
    width: int


@pytest.mark.parametrize(
    "world,kwargs,expected",
    [
        # automatic: cfg 2 first when guidance is used, then ulysses up to the heads, then ring
        (1, {"num_heads": 24}, (1, 1, 1, 1)),
        (2, {"num_heads": 24}, (1, 2, 1, 1)),
        (2, {"num_heads": 24, "use_cfg": False}, (1, 1, 2, 1)),
        (8, {"num_heads": 24}, (1, 2, 4, 1)),
        (8, {"num_heads": 4, "use_cfg": False}, (1, 1, 4, 2)),
        (16, {"num_heads": 4}, (1, 2, 4, 2)),
        # 49 frames at 480x848 (N = 14310 = 2*3^3*5*53): 4 does not divide N, the sequence is padded to 14312
        (8, {"num_heads": 24, "token_counts": [14310]}, (1, 2, 4, 1)),
        (6, {"num_heads": 24, "use_cfg": False, "token_counts": [14310]}, (1, 1, 6, 1)),
        (16, {"num_heads": 24, "token_counts": [44520, 14310]}, (1, 2, 8, 1)),
        # never more sequence-parallel ranks than the smallest item has tokens: the rest is data parallel
        (8, {"num_heads": 4, "use_cfg": False, "token_counts": [3]}, (4, 1, 2, 1)),
        # without padding (xfuser) ulysses x ring must also divide every count: 4 does not divide 14310
        (8, {"num_heads": 24, "token_counts": [14310], "pad": False}, (2, 2, 2, 1)),
        # explicit: missing degrees are 1, data parallel fills the rest
        (8, {"num_heads": 24, "ulysses": 2}, (4, 1, 2, 1)),
        (8, {"num_heads": 24, "ulysses": 2, "ring": 2, "cfg": 2}, (1, 2, 2, 2)),
        (4, {"num_heads": 4, "cfg": 1, "ring": 2}, (2, 1, 1, 2)),
    ],
)
def test_choose_topology(world, kwargs, expected):
    t = choose_topology(world, **kwargs)
    assert (t.dp, t.cfg, t.ulysses, t.ring) == expected
    assert t.dp * t.cfg * t.sp == world


@pytest.mark.parametrize(
    "world,kwargs,message",
    [
        (
            7,
            {"num_heads": 24, "ulysses": 7},
            "does not divide the model's 24 attention heads; working ulysses degrees for world size 7: 1",
        ),
        (8, {"num_heads": 4, "ulysses": 8}, "working ulysses degrees for world size 8: 1, 2, 4"),
        (6, {"num_heads": 24, "ulysses": 4}, "does not divide the world size 6"),
        (4, {"num_heads": 24, "cfg": 3}, "cfg 0, 1 or 2"),
    ],
)
def test_choose_topology_errors(world, kwargs, message):
    with pytest.raises(TopologyError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        choose_topology(world, **kwargs)
    assert info.value.exit_code == EXIT_PARALLEL


def test_mesh_shape_lists_the_degrees_outermost_first():
    # The groups these dims give each rank are pinned on real processes in test_runtime_mesh.py.
    assert MESH_DIMS == ("dp", "cfg", "ring", "ulysses")
    assert Topology(48, dp=3, cfg=2, ulysses=4, ring=2).mesh_shape == (3, 2, 2, 4)


def test_visual_tokens_match_mochi_facts():
    assert visual_tokens(163, 480, 848) == 44520
    assert visual_tokens(49, 480, 848) == 14310
    assert visual_tokens(13, 64, 64) == 48


def test_working_layouts_for_49_frames():
    padded = working_layouts([14310], num_heads=24, max_sp=6)
    assert sorted({u * r for u, r in padded}) == [1, 2, 3, 4, 5, 6]
    assert (4, 1) in padded and (2, 2) in padded and (5, 1) not in padded  # 5 does not divide the heads
    unpadded = working_layouts([14310], num_heads=24, max_sp=6, pad=False)
    assert sorted({u * r for u, r in unpadded}) == [1, 2, 3, 5, 6]
    assert (4, 1) not in unpadded and (2, 2) not in unpadded


@pytest.mark.parametrize(
    "topology,shape",
    [
        (Topology(4, dp=1, cfg=1, ulysses=4, ring=1), (49, 480, 848)),  # N = 14310: 2 padded tokens
        (Topology(8, dp=1, cfg=1, ulysses=8, ring=1), (49, 480, 848)),
        (Topology(16, dp=1, cfg=1, ulysses=8, ring=2), (163, 480, 848)),  # N = 44520: 8 padded tokens
        (Topology(3, dp=1, cfg=1, ulysses=1, ring=3), (7, 64, 80)),  # N = 40
    ],
)
def test_native_backend_runs_any_length_on_any_degree(topology, shape):
    check_items(topology, [Shape("a", *shape)], num_heads=24)


def test_xfuser_backend_cannot_pad_and_lists_working_degrees():
    items = [Shape(f"clip-{i}", 49, 480, 848) for i in range(5)]
    with pytest.raises(TopologyError) as info:
        check_items(Topology(4, dp=1, cfg=1, ulysses=4, ring=1), items, num_heads=24, sp_backend="xfuser")
    assert info.value.exit_code == EXIT_PARALLEL
    text = str(info.value)
    assert (
        "49 frames at 480x848: N=14310; the xfuser backend cannot pad, so ulysses x ring must divide 14310 but is "
        "4x1=4 (items clip-0, clip-1, clip-2 (+2 more)); working: 1, 2, 3, 5, 6; the native backend pads any length"
    ) in text
    # layouts that fit both the items and the world size of 4
    assert (
        "(cfg x ulysses x ring) that fit world size 4 and every item: 2x2x1, 2x1x2, 1x2x1, 2x1x1, 1x1x2, 1x1x1" in text
    )


def test_heads_error_lists_layouts_that_fit_the_world():
    items = [Shape("a", 13, 64, 64), Shape("b", 7, 48, 48)]  # N = 48 and 2 * 9 = 18
    with pytest.raises(TopologyError) as info:
        check_items(Topology(8, dp=1, cfg=1, ulysses=8, ring=1), items, num_heads=4)
    text = str(info.value)
    assert "ulysses degree 8 does not divide the 4 attention heads (working: 1, 2, 4)" in text
    assert "frames at" not in text  # the native backend pads both shapes
    assert text.endswith(
        "layouts (cfg x ulysses x ring) that fit world size 8: 2x4x1, 1x4x2, 2x2x2, 1x2x4, 2x1x4, 1x1x8, 1x4x1, "
        "2x2x1, 1x2x2, 2x1x2, 1x1x4, 1x2x1, 2x1x1, 1x1x2, 1x1x1"
    )


def test_check_shapes_reports_counted_items_like_check_items():
    from batchgen.core.item import ShapeGroup
    from batchgen.core.topology import check_shapes

    groups = [ShapeGroup(49, 480, 848, items=1000, examples=("a", "b", "c")), ShapeGroup(163, 480, 848, 5, ("d",))]
    xfuser_8 = Topology(8, dp=1, cfg=1, ulysses=8, ring=1)
    with pytest.raises(TopologyError) as info:
        check_shapes(xfuser_8, groups, num_heads=24, sp_backend="xfuser")
    text = str(info.value)
    assert "must divide 14310 but is 8x1=8 (items a, b, c (+997 more))" in text
    assert "163 frames" not in text  # N = 44520 divides by 8
    check_shapes(xfuser_8, groups[1:], num_heads=24, sp_backend="xfuser")
    check_shapes(xfuser_8, groups, num_heads=24)  # native: padded


def test_bad_frame_size_is_reported():
    with pytest.raises(TopologyError, match="50x64: height and width must be multiples of 16"):
        check_items(Topology(2, dp=1, cfg=1, ulysses=2, ring=1), [Shape("a", 13, 50, 64)], num_heads=4)


def test_check_items_passes_fitting_items():
    check_items(Topology(4, dp=1, cfg=1, ulysses=2, ring=2), [Shape("a", 13, 64, 64)], num_heads=4)
    check_items(Topology(6, dp=1, cfg=1, ulysses=6, ring=1), [Shape("a", 49, 480, 848)], num_heads=24)


def test_topology_module_does_not_import_torch():
    code = "import sys, batchgen.core.topology; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
