"""Run a function on N real gloo processes (one fresh process group and port per call).

Children are forked from a forkserver that has already imported torch and diffusers, so a case costs a fork,
not N cold imports. Each child gets torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
a short ``init_process_group`` timeout, and reports its return value or its traceback. A child that fails or
hangs fails the call with the rank named; the others are killed, never left running.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import random
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

INIT_TIMEOUT_S = 30
_context = None


def _mp_context():
    global _context
    if _context is None:
        _context = mp.get_context("forkserver")
        _context.set_forkserver_preload(["torch", "torch.distributed", "diffusers", "batchgen.parallel.usp"])
    return _context


def rank_context(degrees: dict[str, int], num_heads: int, backend: str = "native"):
    """On a rank started by ``run_world``: the ``TorchContext`` of ``degrees`` (ulysses, ring, cfg; 1 where
    absent). ``backend`` "xfuser-shim" runs the xfuser backend on the CPU shim of xfuser's attention."""
    from batchgen.core.config import ParallelConfig
    from batchgen.parallel.runtime import TorchContext

    if backend == "xfuser-shim":
        from tests import _xfuser_shim

        _xfuser_shim.install()
        backend = "xfuser"
    config = ParallelConfig(
        ulysses_degree=degrees.get("ulysses", 1),
        ring_degree=degrees.get("ring", 1),
        cfg_degree=degrees.get("cfg", 1),
        sp_backend=backend,
    )
    return TorchContext.from_env(config, num_heads=num_heads, timeout_s=INIT_TIMEOUT_S)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_block(count: int) -> int:
    """The first of ``count`` consecutive ports that are free now, below Linux's ephemeral range (32768-60999), so
    no outgoing connection (a scrape, a moto request) is given one of them before the server binds it."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20_000, 32_000 - count)
        try:
            with contextlib.ExitStack() as stack:
                for port in range(first, first + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports below 32000")


def _child(fn: Callable, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        # Pickled by value here: through the queue torch would pass tensors as file descriptors that the parent
        # fetches from this process later, which fails (EOFError) once this process has exited.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 120) -> list[Any]:
    """``fn(*args)`` on ``world_size`` processes; returns the per-rank results in rank order.

    ``fn`` must be importable (module level) and its arguments and result picklable. It initialises the process
    group itself (e.g. through ``TorchContext.from_env``); pass ``INIT_TIMEOUT_S`` as its timeout.
    """
    ctx = _mp_context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, args, results)) for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, value = results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                outcomes[rank] = (ok, value)
                if not ok:
                    break  # the others may be blocked in a collective with the failed rank: stop waiting
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcomes]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(outcomes))
                    raise TimeoutError(f"ranks {missing} did not finish within {timeout_s}s") from None
    finally:
        for p in procs:
            p.join(timeout=0 if len(outcomes) < world_size else 10)
            if p.is_alive():
                p.kill()
                p.join()
    failed = [(r, v) for r, (ok, v) in sorted(outcomes.items()) if not ok]
    if failed:
        rank, tb = failed[0]
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{tb}")
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]
