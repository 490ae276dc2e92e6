"""How the worker loop sees the process layout, without importing torch.

``SingleProcess`` is the plain case. Under torchrun, ``batchgen.parallel.runtime.TorchContext``
implements the same interface over torch.distributed. The worker loop only needs: which data-parallel
group am I in, am I the group's writer, and a way for all ranks to agree on a Python object.
"""

from __future__ import annotations

import os
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class ProcessContext(Protocol):
    rank: int
    world_size: int
    dp_rank: int
    """Index of this process's data-parallel group."""
    dp_size: int
    """Number of data-parallel groups; items are dealt round-robin to groups."""
    is_writer: bool
    """Exactly one rank per data-parallel group writes outputs."""

    def broadcast(self, obj: T) -> T:
        """Rank 0's object on every rank."""

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff ``flag`` is True on every rank (for agreeing on failure)."""

    def barrier(self) -> None: ...

    def close(self) -> None: ...


class SingleProcess:
    rank = 0
    world_size = 1
    dp_rank = 0
    dp_size = 1
    is_writer = True

    def broadcast(self, obj: Any) -> Any:
        return obj

    def all_true(self, flag: bool) -> bool:
        return flag

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


def under_torchrun() -> bool:
    """True when launched by torchrun (or the training operator) with more than one process."""
    env = os.environ
    return "RANK" in env and "LOCAL_RANK" in env and int(env.get("WORLD_SIZE", "1")) > 1


def open_context(parallel, *, num_heads: int, use_cfg: bool, token_counts: tuple[int, ...] = ()):
    """The process context for a command: a TorchContext under torchrun (imports torch), else SingleProcess.

    Returns (context, topology). The topology's degrees are checked against the model's heads and the items'
    token counts before any weights load (``batchgen.core.topology.check_items`` does the per-item check).
    """
    from batchgen.core.topology import topology_for

    if under_torchrun():
        from batchgen.parallel.runtime import TorchContext

        context = TorchContext.from_env(parallel, num_heads=num_heads, use_cfg=use_cfg, token_counts=token_counts)
        return context, context.topology
    topology = topology_for(parallel, 1, num_heads=num_heads, use_cfg=use_cfg, token_counts=token_counts)
    return SingleProcess(), topology
