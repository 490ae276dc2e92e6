"""Parallel degrees and the shape checks that must pass before any weights load. No torch here.

World size = data-parallel x cfg x ulysses x ring. Rank order (innermost first): ulysses, ring, cfg, data
(``MESH_DIMS``, outermost first), so the Ulysses all-to-all, the heaviest collective, stays between neighbouring
ranks (the same node's NVLink).

What decides which degrees can work (the family's facts come from its ``batchgen.models`` spec):
- Ulysses scatters attention heads, so its degree must divide the heads (24 for Mochi 1, 12 for Wan 1.3B, 40 for
  Wan 14B, 4 for the tiny models).
- Every sequence-parallel rank holds an equal contiguous slice of the visual tokens. The native backend pads
  N = T * (H / 16) * (W / 16) (T = latent frames: Mochi (F - 1) / 6 + 1, Wan (F - 1) / 4 + 1) up to a multiple of ulysses x ring with tokens attention
  ignores, so any length runs on any degree: Mochi's 1590 tokens per 480x848 frame (2 * 3 * 5 * 53) at 49 frames
  (14,310) take ulysses 4 with 2 padded tokens. The xfuser backend cannot pad (xDiT's attention takes no mask),
  so there ulysses x ring must divide N for every item, and the check says so before the weights load instead
  of failing in a collective after.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Protocol

from batchgen.core.errors import TopologyError
from batchgen.core.item import EXAMPLES_PER_SHAPE, ShapeGroup
from batchgen.models import MOCHI, ModelSpec

MESH_DIMS = ("dp", "cfg", "ring", "ulysses")
"""The process mesh's dimensions, outermost first: rank = ((dp * cfg + cfg_rank) * ring + ring_rank) * ulysses +
ulysses_rank, so data-parallel group ``d`` holds ranks ``d * group_size`` up to ``(d + 1) * group_size - 1``."""


@dataclass(frozen=True)
class Topology:
    world_size: int
    dp: int
    cfg: int
    ulysses: int
    ring: int

    def __post_init__(self) -> None:
        for name in ("world_size", "dp", "cfg", "ulysses", "ring"):
            if getattr(self, name) < 1:
                raise TopologyError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cfg not in (1, 2):
            raise TopologyError(f"cfg degree must be 1 or 2, got {self.cfg}")
        if self.dp * self.cfg * self.ulysses * self.ring != self.world_size:
            raise TopologyError(
                f"dp {self.dp} x cfg {self.cfg} x ulysses {self.ulysses} x ring {self.ring} "
                f"= {self.dp * self.cfg * self.ulysses * self.ring}, not the world size {self.world_size}"
            )

    @property
    def sp(self) -> int:
        """Sequence-parallel degree: ranks that share one forward pass's visual tokens."""
        return self.ulysses * self.ring

    @property
    def group_size(self) -> int:
        """Ranks that work on one item together (one data-parallel group)."""
        return self.cfg * self.sp

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        """The degrees in ``MESH_DIMS`` order: the shape of the runtime's ``DeviceMesh``."""
        return tuple(getattr(self, dim) for dim in MESH_DIMS)

    def describe(self) -> str:
        return f"world {self.world_size} = dp {self.dp} x cfg {self.cfg} x ulysses {self.ulysses} x ring {self.ring}"

    def to_dict(self) -> dict[str, int]:
        return {
            "world_size": self.world_size,
            "dp": self.dp,
            "cfg": self.cfg,
            "ulysses": self.ulysses,
            "ring": self.ring,
        }


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_topology(
    world_size: int,
    *,
    ulysses: int = 0,
    ring: int = 0,
    cfg: int = 0,
    num_heads: int,
    use_cfg: bool = True,
    token_counts: Collection[int] = (),
    pad: bool = True,
) -> Topology:
    """Degrees for ``world_size`` ranks.

    Explicit mode (any degree given, i.e. non-zero): degrees not given are 1 and data parallel fills the rest.
    Automatic mode (all degrees 0): the whole world works on one item: cfg 2 when guidance is used, then the
    largest Ulysses degree that divides the heads, then ring for what is left; the sequence is padded to fit.
    ulysses x ring stays within the smallest count in ``token_counts`` (more ranks than tokens would hold
    nothing but padding) and, without padding (``pad=False``, the xfuser backend), divides every count; what is
    left becomes data parallel.
    """
    if world_size < 1:
        raise TopologyError(f"world size must be >= 1, got {world_size}")
    if num_heads < 1:
        raise TopologyError(f"num_heads must be >= 1, got {num_heads}")
    if any(d < 0 for d in (ulysses, ring, cfg)) or cfg > 2:
        raise TopologyError(f"degrees must be >= 0 and cfg 0, 1 or 2; got ulysses {ulysses} ring {ring} cfg {cfg}")
    if ulysses or ring or cfg:
        ulysses, ring, cfg = ulysses or 1, ring or 1, cfg or 1
        hint = layouts_hint(world_size, num_heads=num_heads, token_counts=token_counts, use_cfg=use_cfg, pad=pad)
        if num_heads % ulysses:
            working = [d for d in _divisors(num_heads) if world_size % d == 0]
            raise TopologyError(
                f"ulysses degree {ulysses} does not divide the model's {num_heads} attention heads; "
                f"working ulysses degrees for world size {world_size}: {', '.join(map(str, working))}; {hint}"
            )
        group = cfg * ulysses * ring
        if world_size % group:
            raise TopologyError(
                f"cfg {cfg} x ulysses {ulysses} x ring {ring} = {group} does not divide the world size "
                f"{world_size}; data parallel needs a whole number of groups; {hint}"
            )
        return Topology(world_size, world_size // group, cfg, ulysses, ring)

    remaining = world_size
    cfg = 2 if use_cfg and remaining % 2 == 0 else 1
    remaining //= cfg

    most = min(token_counts, default=remaining)
    common = math.gcd(*token_counts) if token_counts else 0

    def fits(sp: int) -> bool:
        return sp <= most and (pad or not common or common % sp == 0)

    ulysses = max(d for d in _divisors(remaining) if num_heads % d == 0 and fits(d))
    remaining //= ulysses
    ring = max(d for d in _divisors(remaining) if fits(ulysses * d))
    return Topology(world_size, remaining // ring, cfg, ulysses, ring)


class _Degrees(Protocol):
    """What ``topology_for`` reads of a ``batchgen.core.config.ParallelConfig`` (read-only: a frozen dataclass)."""

    @property
    def ulysses_degree(self) -> int: ...
    @property
    def ring_degree(self) -> int: ...
    @property
    def cfg_degree(self) -> int: ...
    @property
    def sp_backend(self) -> str: ...


class _ShapedItem(Protocol):
    """What the shape checks read of an item (read-only: ``batchgen.core.item.Item`` is frozen)."""

    @property
    def id(self) -> str: ...
    @property
    def num_frames(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def width(self) -> int: ...


def visual_tokens(num_frames: int, height: int, width: int, *, spec: ModelSpec = MOCHI) -> int:
    """Visual tokens of one transformer forward of ``spec``'s family: latent frames x (H / 16) x (W / 16)."""
    return spec.visual_tokens(num_frames, height, width)


def working_layouts(
    tokens: Iterable[int], *, num_heads: int, max_sp: int | None = None, pad: bool = True
) -> list[tuple[int, int]]:
    """(ulysses, ring) pairs with ulysses dividing the heads, smallest product first, up to ``max_sp`` (default:
    the largest product that divides every token count). Without padding (``pad=False``, the xfuser backend)
    ulysses x ring must also divide every token count."""
    g = 0
    for n in tokens:
        g = math.gcd(g, n)
    limit = max_sp or g or 1
    pairs: list[tuple[int, int]] = []
    for sp in range(1, limit + 1):
        if pad or g == 0 or g % sp == 0:
            pairs.extend((u, sp // u) for u in _divisors(sp) if num_heads % u == 0)
    return pairs


def shape_token_counts(shapes: Iterable[ShapeGroup], *, spec: ModelSpec = MOCHI) -> tuple[int, ...]:
    """The distinct visual token counts of a plan's shapes (what ``choose_topology`` fits automatic degrees to)."""
    return tuple(sorted({spec.visual_tokens(g.num_frames, g.height, g.width) for g in shapes}))


def topology_for(
    parallel: _Degrees,
    world_size: int,
    *,
    num_heads: int,
    use_cfg: bool,
    spec: ModelSpec = MOCHI,
    shapes: Collection[ShapeGroup] = (),
    token_counts: Collection[int] | None = None,
) -> Topology:
    """The degrees of ``parallel`` (0 = automatic) for ``world_size`` ranks running ``spec``'s model with
    ``num_heads`` heads: fitted to the token counts (of ``shapes`` unless given) and, for sequence parallelism,
    checked against every shape. What every command and launcher asks before anything starts."""
    counts = shape_token_counts(shapes, spec=spec) if token_counts is None else token_counts
    topology = choose_topology(
        world_size,
        ulysses=parallel.ulysses_degree,
        ring=parallel.ring_degree,
        cfg=parallel.cfg_degree,
        num_heads=num_heads,
        use_cfg=use_cfg,
        token_counts=counts,
        pad=parallel.sp_backend != "xfuser",
    )
    if topology.sp > 1 and shapes:
        check_shapes(topology, shapes, spec=spec, num_heads=num_heads, sp_backend=parallel.sp_backend)
    return topology


def fitting_layouts(
    world_size: int, *, num_heads: int, token_counts: Collection[int] = (), use_cfg: bool = True, pad: bool = True
) -> list[str]:
    """Every "CxUxR" (cfg x ulysses x ring) that fits ``world_size`` ranks, the heads and, without padding (the
    xfuser backend), every token count (data parallel fills the rest), those using the most ranks per item first."""
    layouts = []
    for cfg in (2, 1) if use_cfg else (1,):
        if world_size % cfg:
            continue
        group_world = world_size // cfg
        pairs = working_layouts(token_counts, num_heads=num_heads, max_sp=group_world, pad=pad)
        layouts += [(cfg * u * r, u, cfg, r) for u, r in pairs if group_world % (u * r) == 0]
    return [f"{c}x{u}x{r}" for _, u, c, r in sorted(layouts, reverse=True)]


def layouts_hint(
    world_size: int, *, num_heads: int, token_counts: Collection[int] = (), use_cfg: bool = True, pad: bool = True
) -> str:
    fitting = fitting_layouts(world_size, num_heads=num_heads, token_counts=token_counts, use_cfg=use_cfg, pad=pad)
    items = " and every item" if token_counts and not pad else ""
    return f"layouts (cfg x ulysses x ring) that fit world size {world_size}{items}: " + (", ".join(fitting) or "none")


def check_items(
    topology: Topology,
    items: Iterable[_ShapedItem],
    *,
    num_heads: int,
    sp_backend: str = "native",
    spec: ModelSpec = MOCHI,
) -> None:
    """Raise TopologyError if the degrees cannot run every item, listing the degrees that would."""
    by_shape: dict[tuple[int, int, int], list[str]] = {}
    for item in items:
        by_shape.setdefault((item.num_frames, item.height, item.width), []).append(item.id)
    groups = [
        ShapeGroup(*shape, items=len(ids), examples=tuple(ids[:EXAMPLES_PER_SHAPE])) for shape, ids in by_shape.items()
    ]
    check_shapes(topology, groups, num_heads=num_heads, sp_backend=sp_backend, spec=spec)


def check_shapes(
    topology: Topology,
    shapes: Iterable[ShapeGroup],
    *,
    num_heads: int,
    sp_backend: str = "native",
    spec: ModelSpec = MOCHI,
) -> None:
    """``check_items`` for items already counted per shape (a plan's ``shapes``). The native backend pads any
    token count; ``sp_backend='xfuser'`` cannot, so there ulysses x ring must divide every item's count."""
    problems: list[str] = []
    if num_heads % topology.ulysses:
        heads_ok = ", ".join(str(d) for d in _divisors(num_heads))
        problems.append(
            f"ulysses degree {topology.ulysses} does not divide the {num_heads} attention heads (working: {heads_ok})"
        )

    pad = sp_backend != "xfuser"
    by_shape = {(g.num_frames, g.height, g.width): g for g in shapes}
    token_counts = {shape: spec.visual_tokens(*shape) for shape in by_shape}
    cell = spec.size_multiple
    for (frames, height, width), group in sorted(by_shape.items()):
        if height % cell or width % cell:
            problems.append(f"{frames} frames at {height}x{width}: height and width must be multiples of {cell}")
            continue
        n = token_counts[(frames, height, width)]
        if not pad and n % topology.sp:
            # Degrees beyond the world size cannot be launched anyway; 8 keeps single-node options in view.
            limit = max(topology.world_size, 8)
            working = ", ".join(str(d) for d in _divisors(n) if d <= limit)
            more = group.items - len(group.examples)
            shown = ", ".join(group.examples) + (f" (+{more} more)" if more > 0 else "")
            problems.append(
                f"{frames} frames at {height}x{width}: N={n}; the {sp_backend} backend cannot pad, so ulysses x ring "
                f"must divide {n} but is {topology.ulysses}x{topology.ring}={topology.sp} (items {shown}); "
                f"working: {working}; the native backend pads any length"
            )
    if not problems:
        return
    hint = layouts_hint(topology.world_size, num_heads=num_heads, token_counts=tuple(token_counts.values()), pad=pad)
    raise TopologyError(
        f"parallel degrees do not fit ({topology.describe()}):\n  " + "\n  ".join(problems) + f"\n  {hint}"
    )
