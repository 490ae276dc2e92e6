"""The Python API (``batchgen.dataset``) and ``batchgen export --format webdataset`` on a real finished run, read
back with the ``webdataset`` library and Hugging Face ``datasets``; S3 output on the moto server."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import yaml

from batchgen.cli import main
from batchgen.core.errors import EXIT_CONFLICT, InputError, NotFoundError, StorageError
from batchgen.dataset import open_run, sample_position
from batchgen.dataset.export import MANIFEST_KEY, ExportOptions, export_webdataset, split_shards
from batchgen.storage import LocalStorage, open_storage
from tests._datasets import BLACK_ITEM, RUN_ITEMS, finished_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_config, tiny_model_dir):
    folder = tmp_path_factory.mktemp("dataset")
    storage = LocalStorage(folder / "out")
    plan = finished_run(storage, folder, tiny_config, tiny_model_dir)
    return storage.root / plan.run_id


def test_open_run_index_and_videos(run_dir, tmp_path):
    run = open_run(str(run_dir))
    assert open_run(str(run_dir.parent)).run_id == open_run(run_dir.as_uri()).run_id == run.run_id == run_dir.name
    table = run.index()
    assert table.column("id").to_pylist() == [f"clip.{i}" for i in range(RUN_ITEMS)]
    videos = list(run.videos())
    assert [v.flags for v in videos] == [["black", "frozen"] if v.id == BLACK_ITEM else [] for v in videos]
    for video, data in run.read_videos(threads=2):
        assert hashlib.sha256(data).hexdigest() == video.metadata["sha256"] and video.prompt
    assert run.select(unflagged=True).column("id").to_pylist() == [v.id for v in videos if v.id != BLACK_ITEM]
    half = run.select(fraction=0.5, seed=3).column("id").to_pylist()
    assert half == [v.id for v in videos if sample_position(3, v.id) < 0.5]
    assert set(half) <= set(run.select(fraction=0.8, seed=3).column("id").to_pylist())

    with pytest.raises(InputError, match="holds no run"):
        open_run(str(tmp_path))
    with pytest.raises(InputError, match="fraction"):
        run.select(fraction=0)
    stored = run_dir / "videos" / "shard-000000" / "clip.0.mp4"
    stored.rename(tmp_path / "moved.mp4")
    try:
        with pytest.raises(NotFoundError):
            videos[0].read()
        stored.write_bytes((tmp_path / "moved.mp4").read_bytes()[:-1] + b"\0")
        with pytest.raises(StorageError, match="clip.0.mp4: content does not match the sha256"):
            videos[0].read()
    finally:
        (tmp_path / "moved.mp4").replace(stored)


def test_missing_index_says_how_to_build_it(run_dir):
    index = run_dir / "index" / "index.parquet"
    saved = index.read_bytes()
    index.unlink()
    try:
        with pytest.raises(NotFoundError, match="batchgen index"):
            open_run(str(run_dir)).index()
    finally:
        index.write_bytes(saved)


def test_split_shards_by_count_and_bytes(run_dir):
    table = open_run(str(run_dir)).index()
    sizes = table.column("size_bytes").to_pylist()
    assert [s.num_rows for s in split_shards(table, 2, 10**9)] == [2, 2, 1]
    by_bytes = split_shards(table, 100, sizes[0] + sizes[1])
    assert by_bytes[0].num_rows == 2 and sum(s.num_rows for s in by_bytes) == RUN_ITEMS
    assert [s.num_rows for s in split_shards(table, 100, 1)] == [1] * RUN_ITEMS  # one oversized video per tar


def _download(storage, manifest, folder):
    paths = []
    for shard in manifest["shards"]:
        path = folder / shard["key"]
        path.write_bytes(storage.get_bytes(shard["key"]))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        paths.append(str(path))
    return paths


def test_export_to_s3_reads_back_with_webdataset_and_datasets(run_dir, s3_uri, tmp_path, capsys):
    import webdataset as wds
    from datasets import Video, load_dataset

    code = main(["export", str(run_dir), "--format", "webdataset", "--out", s3_uri, "--unflagged", "--max-count", "2"])
    assert code == 0, capsys.readouterr().err
    assert "4 samples in 2 tar(s)" in capsys.readouterr().out
    out = open_storage(s3_uri)
    manifest = json.loads(out.get_bytes(MANIFEST_KEY))
    assert (manifest["samples"], [s["samples"] for s in manifest["shards"]]) == (4, [2, 2])
    index = {row["id"]: row for row in open_run(str(run_dir)).index().to_pylist()}
    paths = _download(out, manifest, tmp_path)

    samples = list(wds.WebDataset(paths, shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["clip%2E0", "clip%2E1", "clip%2E2", "clip%2E4"]
    for sample in samples:
        meta = json.loads(sample["json"])
        assert hashlib.sha256(sample["mp4"]).hexdigest() == index[meta["id"]]["sha256"] == meta["sha256"]
        assert sample["txt"].decode() == index[meta["id"]]["prompt"]
        assert meta["quality_flags"] == [] and meta["quality_luma_mean"] > 0

    hf = load_dataset("webdataset", data_files={"train": paths}, split="train")
    hf = hf.cast_column("mp4", Video(decode=False))  # the raw MP4 bytes, no torchcodec needed
    assert len(hf) == 4
    for record in hf:
        meta = record["json"]
        assert hashlib.sha256(record["mp4"]["bytes"]).hexdigest() == index[meta["id"]]["sha256"]
        assert record["txt"] == index[meta["id"]]["prompt"]


def test_export_resumes_adopts_and_refuses_another_export(run_dir, tmp_path):
    run = open_run(str(run_dir))
    out = LocalStorage(tmp_path / "wds")
    options = ExportOptions(max_count=2)
    first = export_webdataset(run, out, options)
    tars = {s["key"]: (out.root / s["key"]).stat().st_mtime_ns for s in first["shards"]}
    assert export_webdataset(run, out, options) == first  # finished: nothing written
    assert {k: (out.root / k).stat().st_mtime_ns for k in tars} == tars

    # A crash after two tars: the rerun keeps them (checked) and writes the rest and the manifest.
    (out.root / MANIFEST_KEY).unlink()
    (out.root / "shard-000002.tar").unlink()
    again = export_webdataset(run, out, options)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in first["shards"]]
    assert (out.root / "shard-000000.tar").stat().st_mtime_ns == tars["shard-000000.tar"]

    assert main(["export", str(run_dir), "--out", str(out.root), "--fraction", "0.5"]) == EXIT_CONFLICT

    # A tar that does not hold the planned samples is never adopted.
    (out.root / MANIFEST_KEY).unlink()
    tampered = io.BytesIO()
    with tarfile.open(fileobj=tampered, mode="w") as tar:
        info = tarfile.TarInfo("clip%2E0.mp4")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    (out.root / "shard-000000.tar").write_bytes(tampered.getvalue())
    with pytest.raises(Exception, match="does not hold this export's 2 samples") as caught:
        export_webdataset(run, out, options)
    assert caught.value.exit_code == EXIT_CONFLICT
    assert not out.exists(MANIFEST_KEY)


@pytest.mark.parametrize(
    "flags", [["--fraction", "0"], ["--fraction", "1.5"], ["--max-count", "0"], ["--format", "tar"]]
)
def test_export_arguments_are_checked(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(tmp_path), "--out", str(tmp_path / "wds"), *flags])
    assert exit_.value.code == 2 and flags[0] in capsys.readouterr().err
    assert not (tmp_path / "wds").exists()


LOAD_OFFLINE = """
import hashlib, json, sys
from datasets import Video, load_dataset
ds = load_dataset(sys.argv[1])
ds = {name: split.cast_column("mp4", Video(decode=False)) for name, split in ds.items()}
print(json.dumps({name: [[r["json"]["id"], hashlib.sha256(r["mp4"]["bytes"]).hexdigest(), r["txt"]] for r in split]
                  for name, split in ds.items()}))
"""


def test_export_writes_a_dataset_card_that_load_dataset_reads_offline(run_dir, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out), "--max-count", "2"]) == 0, capsys.readouterr().err
    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    manifest = json.loads((out / MANIFEST_KEY).read_text())
    tars = [shard["key"] for shard in manifest["shards"]]
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": tars}]}]
    assert meta["task_categories"] == ["text-to-video"]
    run = open_run(str(run_dir))
    for fact in (run.plan.manifest_digest, run.plan.config.model.family, f"samples: {RUN_ITEMS} in 3 tar(s)",
                 "1 of 5 samples carry a quality flag", "| num_inference_steps |"):  # fmt: skip
        assert fact in body, fact
    assert next(iter(run.index().column("model_fingerprint").to_pylist())) in body

    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    loaded = subprocess.run([sys.executable, "-c", LOAD_OFFLINE, str(out)], capture_output=True, text=True, env=env)
    assert loaded.returncode == 0, loaded.stderr
    index = {row["id"]: row for row in run.index().to_pylist()}
    rows = json.loads(loaded.stdout)["train"]
    assert sorted(r[0] for r in rows) == sorted(index)
    for item_id, sha, prompt in rows:
        assert (sha, prompt) == (index[item_id]["sha256"], index[item_id]["prompt"])
