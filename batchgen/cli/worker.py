"""``batchgen worker``: process some shards of a planned run (one process, or every rank of a torchrun job)."""

from __future__ import annotations

import argparse

NAME = "worker"
HELP = "generate the pending items of some shards of a planned run (what local runs and Kubernetes jobs start)"
ORDER = 40
DESCRIPTION = (
    "Process the given shards of a run planned under --output: skip what is done (one listing per shard), "
    "generate and commit the rest (video, then sidecar), write each shard's stats last. Under torchrun every "
    "rank runs this command; the degrees split each video across ranks and data parallel fills the rest. "
    "SIGTERM stops between commits (exit 143); items that fail every attempt are recorded under errors/ "
    "(exit 5). Generation settings come from the stored plan."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from batchgen.cli._options import add_config_argument, add_parallel_arguments

    parser.add_argument(
        "--output", required=True, metavar="RUN_URI", help="the run's folder, or the output root it was planned under"
    )
    parser.add_argument("--run-id", default=None, metavar="RUN", help="which run, when --output is a root with several")
    parser.add_argument(
        "--shards", required=True, metavar="SEL", help="'A:B' (half-open indices), '1,3,7', 'shard-000003' or 'all'"
    )
    parser.add_argument("--model-dir", required=True, metavar="DIR", help="model directory of the plan's family")
    parser.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK if available, else cpu)")
    parser.add_argument("--dtype", default="auto", help="weights dtype: auto (bf16 on GPU, fp32 on CPU), bf16, fp32")
    add_config_argument(parser)
    add_parallel_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from batchgen.core import metrics
    from batchgen.core.plan import locate_run, parse_shard_selection

    storage, plan = locate_run(args.output, args.run_id)
    shards = parse_shard_selection(args.shards, plan)
    plan, local = _with_local_settings(args, plan)
    port = metrics.resolve_port(args.metrics_port, local.worker.metrics_port)
    metrics.serve(metrics.WORKER_REGISTRY, port, offset=metrics.local_rank())
    return _run_shards(args, storage, plan, shards).exit_code


def _with_local_settings(args: argparse.Namespace, plan):
    """(the plan with this worker's settings, the config from this worker's flags): generation settings and shard
    size belong to the run; how to run it (degrees, attempts) to this worker."""
    import dataclasses

    from batchgen.cli._options import config_from_args

    local = config_from_args(args)
    config = dataclasses.replace(
        plan.config,
        parallel=local.parallel,
        worker=dataclasses.replace(local.worker, shard_size=plan.shard_size),
    )
    if args.max_attempts is None and args.config is None:
        config = dataclasses.replace(config, worker=plan.config.worker)
    return dataclasses.replace(plan, config=config), local


def _run_shards(args: argparse.Namespace, storage, plan, shards: list[str]):
    """Check the weights and the degrees against the shards' items, then run the worker loop with the family's
    generator (the weights load here, after every check); the summary is logged with the run id."""
    import logging

    from batchgen.core.logs import log_context
    from batchgen.core.plan import load_shard_items
    from batchgen.core.topology import check_items, visual_tokens
    from batchgen.models import check_weights, uses_cfg
    from batchgen.worker.context import open_context
    from batchgen.worker.loop import StopRequest, run_worker

    log = logging.getLogger("batchgen.commands.worker")
    config = plan.config
    spec, parallel = config.spec, config.parallel
    check_weights(args.model_dir, family=spec.family, weights=config.model.weights)  # before any weights load
    num_heads = spec.num_heads(args.model_dir)
    use_cfg = uses_cfg(config.generation.guidance_scale)
    items = [item for shard in shards for item in load_shard_items(storage, plan.run_id, shard)]
    token_counts = tuple(sorted({visual_tokens(i.num_frames, i.height, i.width, spec=spec) for i in items}))
    stop = StopRequest()
    with stop.handling_signals(), log_context(run_id=plan.run_id):
        context, topology = open_context(parallel, num_heads=num_heads, use_cfg=use_cfg, token_counts=token_counts)
        try:
            check_items(topology, items, num_heads=num_heads, sp_backend=parallel.sp_backend, spec=spec)
            generator = spec.generator_class()(
                args.model_dir, context=context, parallel=parallel, device=args.device, dtype=args.dtype,
                max_sequence_length=config.generation.max_sequence_length,
            )  # fmt: skip
            try:
                summary = run_worker(storage, plan, shards, generator, context, stop=stop)
            finally:
                generator.close()
        finally:
            context.close()
        log.info(
            "worker done: %d shard(s), %d generated, %d resumed, %d adopted, %d failed%s",
            len(summary.shards),
            summary.generated,
            summary.resumed,
            summary.adopted,
            summary.failed,
            f", stopped by signal {summary.interrupted}" if summary.interrupted else "",
        )
    return summary
