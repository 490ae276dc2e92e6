"""Object keys of a run. Every name is a pure function of (run, shard, item), so a retry overwrites
or finds the same object and never duplicates one.

Keys are relative to the output root (a bucket prefix or a folder)::

    <run>/plan/run.json              run description: config, fingerprints, shard count (written once)
    <run>/plan/shards/<shard>.parquet the shard's items, parameters resolved
    <run>/plan/model.json            the weights' fingerprint, pinned by the first commit
    <run>/plan/reuse/<shard>.parquet the shard's items to copy from committed videos instead of generating
    <run>/videos/<shard>/<id>.mp4    the video (written first)
    <run>/meta/<shard>/<id>.json     the sidecar: the item's commit marker (written after the video)
    <run>/errors/<shard>/<id>.json   last failure of an item that is not done (cleared by a later success)
    <run>/stats/<shard>.json         shard statistics, written last: the shard's "finished" marker
    <run>/index/index.parquet        one row per committed video
    <run>/index/parts/<shard>-<digest>.parquet  a shard's index rows; <digest> names the sidecars they came from
    <run>/_SUCCESS.json              run-level success marker: every item done, index built
    _runs/<name>/<run>.json          registry marker of a planned run (written after its run.json)
    _content/<run>/<shard>-<digest>.parquet  the output's content map: content key -> committed item, per index part
    _content/<run>.parquet           a run's content map parts merged when its index is built
"""

from __future__ import annotations

SHARD_DIGITS = 6


def shard_id(index: int) -> str:
    return f"shard-{index:0{SHARD_DIGITS}d}"


def shard_index(shard: str) -> int:
    return int(shard.rsplit("-", 1)[1])


def run_prefix(run_id: str) -> str:
    return f"{run_id}/"


def plan_key(run_id: str) -> str:
    return f"{run_id}/plan/run.json"


def model_pin_key(run_id: str) -> str:
    return f"{run_id}/plan/model.json"


def shard_plan_key(run_id: str, shard: str) -> str:
    return f"{run_id}/plan/shards/{shard}.parquet"


def reuse_plan_key(run_id: str, shard: str) -> str:
    return f"{run_id}/plan/reuse/{shard}.parquet"


def video_key(run_id: str, shard: str, item_id: str) -> str:
    return f"{run_id}/videos/{shard}/{item_id}.mp4"


def videos_prefix(run_id: str, shard: str) -> str:
    return f"{run_id}/videos/{shard}/"


def sidecar_key(run_id: str, shard: str, item_id: str) -> str:
    return f"{run_id}/meta/{shard}/{item_id}.json"


def sidecars_prefix(run_id: str, shard: str) -> str:
    return f"{run_id}/meta/{shard}/"


def meta_prefix(run_id: str) -> str:
    return f"{run_id}/meta/"


def videos_root(run_id: str) -> str:
    return f"{run_id}/videos/"


def errors_root(run_id: str) -> str:
    return f"{run_id}/errors/"


def error_key(run_id: str, shard: str, item_id: str) -> str:
    return f"{run_id}/errors/{shard}/{item_id}.json"


def errors_prefix(run_id: str, shard: str) -> str:
    return f"{run_id}/errors/{shard}/"


def stats_key(run_id: str, shard: str) -> str:
    return f"{run_id}/stats/{shard}.json"


def stats_prefix(run_id: str) -> str:
    return f"{run_id}/stats/"


def index_key(run_id: str) -> str:
    return f"{run_id}/index/index.parquet"


def index_parts_prefix(run_id: str) -> str:
    return f"{run_id}/index/parts/"


def index_part_key(run_id: str, shard: str, digest: str) -> str:
    return f"{run_id}/index/parts/{shard}-{digest}.parquet"


def success_key(run_id: str) -> str:
    return f"{run_id}/_SUCCESS.json"


def item_id_from_key(key: str) -> str:
    """'run/meta/shard-000001/abc.json' -> 'abc'."""
    name = key.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[0]


def run_registry_prefix(slug: str = "") -> str:
    """``_runs/[<slug>/]``: one tiny marker per planned run, so finding runs (and a name's earlier runs, for
    plan conflicts) lists a handful of keys instead of every object of every run."""
    return f"_runs/{slug}/" if slug else "_runs/"


def run_registry_key(slug: str, run_id: str) -> str:
    return f"_runs/{slug}/{run_id}.json"


def content_root() -> str:
    """``_content/``: the output's content map, listed once to find every committed item's content key."""
    return "_content/"


def content_part_key(run_id: str, shard: str, digest: str) -> str:
    return f"_content/{run_id}/{shard}-{digest}.parquet"


def content_run_key(run_id: str) -> str:
    return f"_content/{run_id}.parquet"
