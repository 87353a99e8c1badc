"""trainer/storage.py: URLs, filesystems, options from the environment, JSON read as None when absent and
written atomically, run URLs and stored plans; on local files and on moto's S3 server.

Run: .venv/bin/pytest tests/test_storage.py
"""

from __future__ import annotations

import json
import os

import pytest

from trainer.storage import (RunNotFound, expand, filesystem, read_json, read_plan, run_url, storage_options_from_env,
                             write_json, write_text)


def test_storage_options_from_env():
    assert storage_options_from_env({}) == {}
    assert storage_options_from_env({"AWS_ENDPOINT_URL": "http://minio:9000"}) == {"endpoint_url": "http://minio:9000"}
    assert storage_options_from_env({"AWS_ENDPOINT_URL": "a", "AWS_ENDPOINT_URL_S3": "b"}) == {"endpoint_url": "b"}


def test_run_url():
    assert run_url("my-run", "s3://b/llmctl") == "s3://b/llmctl/runs/my-run"
    assert run_url("s3://b/x/runs/r/") == "s3://b/x/runs/r"
    assert run_url("/tmp/r") == "file:///tmp/r"
    home = run_url("r", "file://~/root")
    assert home.startswith("file:///") and "~" not in home and home.endswith("/root/runs/r")


def test_expand():
    assert expand("s3://b/x") == "s3://b/x"
    assert expand("rel/dir") == "file://" + os.path.abspath("rel/dir")
    assert expand("file://~/x") == "file://" + os.path.expanduser("~/x")


def test_json_round_trip_on_local_files(tmp_path):
    url = f"file://{tmp_path}/a/b/doc.json"
    assert read_json(url) is None  # absent: None, not an error
    write_json(url, {"x": [1, 2]})  # parent folders made as needed
    assert read_json(url) == {"x": [1, 2]}
    assert sorted(os.listdir(tmp_path / "a/b")) == ["doc.json"]  # the .tmp was renamed, not left behind
    write_text(url, "[]")
    assert json.loads((tmp_path / "a/b/doc.json").read_text()) == []


def test_read_plan_names_the_missing_run(tmp_path):
    with pytest.raises(RunNotFound, match=f"no run at file://{tmp_path}/r"):
        read_plan(f"file://{tmp_path}/r")
    write_json(f"file://{tmp_path}/r/plan.json", {"name": "r"})
    assert read_plan(f"file://{tmp_path}/r") == {"name": "r"}


def test_s3_uses_the_environment_endpoint_unless_options_are_given(s3_server, monkeypatch):
    bucket = s3_server.bucket("storage")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    write_json(f"{bucket}/runs/r/summary.json", {"ok": True})  # no options: the environment's endpoint
    assert read_json(f"{bucket}/runs/r/summary.json", s3_server.storage_options) == {"ok": True}
    fs, path = filesystem(f"{bucket}/runs/r/")
    assert path == f"{bucket[len('s3://'):]}/runs/r"
    assert [p.rsplit("/", 1)[1] for p in fs.ls(path, detail=False)] == ["summary.json"]
