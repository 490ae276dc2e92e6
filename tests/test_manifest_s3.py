"""Manifests given as s3:// URIs: the same validation, the same run id as the local file, errors naming the URI."""

import pandas as pd

from batchgen.cli import main
from batchgen.core.config import RunConfig
from batchgen.core.plan import make_plan
from batchgen.storage import open_storage


def _manifest(path, prompts):
    pd.DataFrame({"id": [f"v{i}" for i in range(len(prompts))], "prompt": prompts}).to_parquet(path)
    return path


def test_s3_manifest_plans_like_the_local_file(s3_uri, tmp_path):
    local = _manifest(tmp_path / "prompts.parquet", ["a fox", "a boat", "a cloud"])
    open_storage(s3_uri).put_file("inputs/prompts.parquet", local)
    remote = f"{s3_uri}/inputs/prompts.parquet"

    from_local = make_plan(local, RunConfig(), open_storage(str(tmp_path / "out-local")))
    from_s3 = make_plan(remote, RunConfig(), open_storage(str(tmp_path / "out-s3")))
    assert from_s3.run_id == from_local.run_id and from_s3.run_id.startswith("prompts-")
    assert from_s3.source == remote and from_s3.row_count == 3


def test_s3_manifest_errors_name_the_uri(s3_uri, tmp_path, capsys):
    bad = _manifest(tmp_path / "bad.parquet", ["a fox", "  "])
    open_storage(s3_uri).put_file("inputs/bad.parquet", bad)

    assert main(["validate", f"{s3_uri}/inputs/bad.parquet"]) == 2
    err = capsys.readouterr().err
    assert f"{s3_uri}/inputs/bad.parquet" in err and "row 1" in err and "column 'prompt'" in err

    assert main(["validate", f"{s3_uri}/inputs/missing.parquet"]) == 2
    assert "file not found" in capsys.readouterr().err

    assert main(["validate", f"{s3_uri}/inputs/ok.parquet".replace("ok.parquet", "")]) == 2
    assert "must name a file" in capsys.readouterr().err
