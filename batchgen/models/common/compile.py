"""``--compile``: torch.compile the elementwise regions of every transformer block, leaving attention eager.

Each family says which regions (``models/<family>/blocks.py``: ``compiled_forward`` runs the block's compiled
regions around its eager attention calls, so every collective stays outside the compiled graphs and no graph
breaks inside them). The region functions take the block as an argument: Dynamo treats a module argument's
parameters as graph inputs, so blocks of one shape share one graph per region, one compilation per video shape
(``dynamic=False``: each shape gets specialised kernels). The RoPE frequency module is compiled too (once per shape;
its token-split hook runs outside the graph)."""

from __future__ import annotations

import logging
import time
from types import MethodType

import torch

from batchgen.core.errors import ConfigError
from batchgen.models.spec import ModelSpec

log = logging.getLogger("batchgen.generate.compile")

# Graphs per shape: two regions x (ordinary, last block) plus RoPE; room for a few shapes per worker.
RECOMPILE_LIMIT = 64
_STATE_ATTR = "_batchgen_compiled"


class CompiledBlocks:
    """Installed on a transformer by ``compile_blocks``; tells which video shapes were compiled and how long the
    first (compiling) step of each took."""

    def __init__(self) -> None:
        self.shapes: dict[tuple, float] = {}

    def is_new(self, shape: tuple) -> bool:
        return shape not in self.shapes

    def record(self, shape: tuple, first_step_s: float, graphs: int) -> None:
        self.shapes[shape] = first_step_s
        log.info(
            "compiled transformer blocks for latent shape %s: first step %.2fs, %d new graph(s)",
            shape,
            first_step_s,
            graphs,
        )


def compile_blocks(transformer, *, spec: ModelSpec) -> CompiledBlocks:
    """Compile every block's regions and the RoPE module of ``transformer`` in place (idempotent). The blocks are
    where the family's ``ParallelPlan`` says, their compiled forward is the family's (``spec.block_code``);
    ConfigError when ``transformer`` is not the family's transformer."""
    blocks = getattr(transformer, spec.parallel_plan.blocks, None)
    if blocks is None:
        raise ConfigError(
            f"parallel.compile (--compile): {type(transformer).__name__} is not a {spec.title} transformer"
        )
    existing = getattr(transformer, _STATE_ATTR, None)
    if existing is not None:
        return existing
    block_forward = spec.block_code().compiled_forward
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.forward = MethodType(block_forward, block)
    transformer.rope.forward = torch.compile(transformer.rope.forward, dynamic=False)
    state = CompiledBlocks()
    setattr(transformer, _STATE_ATTR, state)
    log.info("transformer blocks compiled lazily: norms, modulation, MLPs and RoPE; attention stays eager")
    return state


def graph_count() -> int:
    """Graphs Dynamo compiled in this process so far (for the log: a new shape adds a handful, a repeat none)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class FirstStepTimer:
    """Times a loop's first step when it compiles a new shape (the compile cost, reported in the sidecar)."""

    def __init__(self, compiled: CompiledBlocks | None, shape: tuple):
        self.active = compiled is not None and compiled.is_new(shape)
        self.compiled, self.shape = compiled, shape
        self.seconds = 0.0
        self._graphs = graph_count() if self.active else 0
        self._started = time.perf_counter()

    def step_done(self) -> None:
        if self.active and self.compiled is not None:
            self.seconds = time.perf_counter() - self._started
            self.compiled.record(self.shape, self.seconds, graph_count() - self._graphs)
            self.active = False
