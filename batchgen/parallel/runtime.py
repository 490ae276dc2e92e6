"""``TorchContext``: the ``ProcessContext`` of a torchrun job, with the dp / cfg / ulysses / ring process groups.

The groups come from a ``DeviceMesh`` of shape ``Topology.mesh_shape`` (dims ``MESH_DIMS``), as torchtitan's
``ParallelDims.build_mesh`` does (torchtitan/distributed/parallel_dims.py), with ulysses x ring flattened into 'sp'.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. On a machine with CUDA each process
takes GPU ``LOCAL_RANK`` and NCCL; otherwise gloo on CPU. ``init_process_group`` gets an explicit timeout so a
peer that died before a collective turns into an error, not a 30-minute hang; torchrun itself stops the other
ranks as soon as one exits non-zero and names the failed rank.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from batchgen.core.config import ParallelConfig
from batchgen.core.errors import InputError
from batchgen.core.topology import MESH_DIMS, Topology, topology_for
from batchgen.parallel.usp import Axis

log = logging.getLogger("batchgen.parallel.runtime")


class _RankPrefix(logging.Filter):
    def __init__(self, rank: int, world_size: int):
        super().__init__()
        self.prefix = f"[rank {rank}/{world_size}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "_batchgen_rank_prefixed", False):
            record.msg = self.prefix + str(record.msg)
            record._batchgen_rank_prefixed = True
        return True


def install_rank_prefix(rank: int, world_size: int) -> None:
    """Prefix every log record of this process with its rank (interleaved torchrun output stays readable)."""
    rank_filter = _RankPrefix(rank, world_size)
    for handler in logging.getLogger().handlers:
        handler.filters = [f for f in handler.filters if not isinstance(f, _RankPrefix)]
        handler.addFilter(rank_filter)


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise InputError(f"environment variable {name} is not set: launch with torchrun")
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name} must be an integer, got {value!r}") from None


def _axis(group: dist.ProcessGroup) -> Axis:
    """This rank's view of one of its mesh groups."""
    ranks = dist.get_process_group_ranks(group)
    return Axis(group=group, size=len(ranks), rank=dist.get_rank(group), ranks=tuple(ranks))


class TorchContext:
    """One process of a torch.distributed job. ``axes[name]`` is this rank's view of its 'dp' group (the
    ranks at the same place in every data-parallel group), 'cfg', 'ulysses', 'ring' and 'sp' groups."""

    def __init__(
        self,
        topology: Topology,
        rank: int,
        device: torch.device,
        backend: str,
        axes: dict[str, Axis],
        *,
        sp_backend: str = "native",
    ):
        self.topology = topology
        self.sp_backend = sp_backend
        """'native' or 'xfuser': what ``parallelize_transformer`` installs."""
        self.rank = rank
        self.world_size = topology.world_size
        self.device = device
        self.backend = backend
        self.axes = axes
        self.dp_rank = axes["dp"].rank
        self.dp_size = topology.dp
        # Rank 0 of its data-parallel group: cfg 0 and sequence-parallel rank 0.
        self.is_writer = axes["cfg"].rank == 0 and axes["sp"].rank == 0
        self._closed = False

    @classmethod
    def from_env(
        cls,
        parallel: ParallelConfig,
        *,
        num_heads: int,
        use_cfg: bool = True,
        timeout_s: float = 600,
        token_counts: tuple[int, ...] = (),
    ) -> TorchContext:
        rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), int(os.environ.get("LOCAL_RANK", "0"))
        # Degrees are checked before the process group starts, so a bad layout fails fast on every rank alike.
        topology = topology_for(parallel, world_size, num_heads=num_heads, use_cfg=use_cfg, token_counts=token_counts)
        if torch.cuda.is_available():
            backend, device = "nccl", torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            backend, device = "gloo", torch.device("cpu")
        install_rank_prefix(rank, world_size)
        if not dist.is_initialized():
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
        context = cls.from_process_group(topology, device=device, sp_backend=parallel.sp_backend)
        log.info("%s on %s (%s)", topology.describe(), device, backend)
        return context

    @classmethod
    def from_process_group(
        cls, topology: Topology, *, device: torch.device | None = None, sp_backend: str = "native"
    ) -> TorchContext:
        """Build the sub-groups over an already initialised default process group."""
        if dist.get_world_size() != topology.world_size:
            raise InputError(f"process group has {dist.get_world_size()} ranks, topology {topology.world_size}")
        device = device or torch.device("cpu")
        # Every rank creates every group in the same order; size-1 groups are real groups too, as xDiT/yunchang
        # expect (None would mean the whole world).
        mesh = init_device_mesh(device.type, topology.mesh_shape, mesh_dim_names=MESH_DIMS)
        # Groups by name, not sliced sub-meshes: each slice is a DeviceMesh whose layout algebra costs CPU time.
        axes = {name: _axis(mesh.get_group(name)) for name in MESH_DIMS}
        # _flatten is private, but it is how torchtitan builds its combined dims (there is no public form).
        axes["sp"] = _axis(mesh["ring", "ulysses"]._flatten("sp").get_group())
        return cls(topology, dist.get_rank(), device, dist.get_backend(), axes, sp_backend=sp_backend)

    # ProcessContext

    def broadcast(self, obj: Any) -> Any:
        holder = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(holder, src=0, device=self._object_device())
        return holder[0]

    def all_true(self, flag: bool) -> bool:
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def barrier(self) -> None:
        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self) -> None:
        if not self._closed and dist.is_initialized():
            dist.destroy_process_group()
        self._closed = True

    def _object_device(self) -> torch.device | None:
        return self.device if self.backend == "nccl" else None

    # Facts recorded with each video

    def describe(self) -> dict[str, Any]:
        return {**self.topology.to_dict(), "backend": self.backend, "device": str(self.device)}
