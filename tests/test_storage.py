"""trainer/storage.py: URLs, filesystems, options from the environment, JSON read as None when absent and
written atomically, run URLs and stored plans; on local files and on moto's S3 server.

Run: .venv/bin/pytest tests/test_storage.py
"""

from __future__ import annotations

import json
import os

import pytest

from trainer.storage import (DocumentTooLarge, RunNotFound, UnsafeFile, expand, filesystem, read_json, read_plan,
                             read_small_json, run_url, storage_options_from_env, update_json, write_json, write_text)


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


# ---------------------------------------------------------------- hostile storage


def test_hostile_write_does_not_follow_a_planted_tmp_link(tmp_path):
    # Shared POSIX storage: someone plants `report.md.tmp -> ~/.bashrc`; the old writer opened that name and
    # wrote the report through the link. The writer's temporary file is its own, opened without following links.
    victim = tmp_path / "bashrc"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / "report.md.tmp")
    write_text(f"file://{run}/report.md", "report text")
    assert victim.read_text() == "precious\n"
    assert (run / "report.md").read_text() == "report text" and not (run / "report.md").is_symlink()
    assert sorted(os.listdir(run)) == ["report.md", "report.md.tmp"]  # ours renamed; the planted link untouched


def test_hostile_write_refuses_a_link_where_the_file_should_be(tmp_path):
    victim = tmp_path / "bashrc"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(victim, run / "summary.json")
    with pytest.raises(UnsafeFile, match="symbolic link"):
        write_json(f"file://{run}/summary.json", {"x": 1})
    with pytest.raises(UnsafeFile, match="symbolic link"):
        read_json(f"file://{run}/summary.json")  # and a reader does not follow it out of the run either
    assert victim.read_text() == "precious\n" and (run / "summary.json").is_symlink()
    assert sorted(os.listdir(run)) == ["summary.json"]  # no temporary file left behind


def test_hostile_json_reads_are_bounded(tmp_path):
    big = tmp_path / "summary.json"
    with open(big, "wb") as f:  # 1 GiB, sparse: costs no disk, and would cost 2 GB of memory read whole
        f.truncate(1 << 30)
    with pytest.raises(DocumentTooLarge):
        read_json(f"file://{big}")
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000)  # 200 KB that blows the parser's stack: ValueError, not RecursionError
    with pytest.raises(ValueError, match="nested"):
        read_json(f"file://{deep}")
    with pytest.raises(ValueError, match="nested"):
        read_small_json(f"file://{deep}", 1 << 20)


HAMMER = """
import sys
from trainer.storage import update_json
url, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    update_json(url, lambda doc: {"items": ((doc or {}).get("items") or []) + [f"{who}-{i}"]})
"""

READ = """
import sys, time
from trainer.storage import read_json
url, stop = sys.argv[1], sys.argv[2]
import os
seen = bad = 0
while not os.path.exists(stop):
    try:
        doc = read_json(url)
        seen += 1
    except Exception as e:
        bad += 1
        print(type(e).__name__, e, file=sys.stderr)
print(seen, bad)
"""


def test_hostile_concurrent_writers_of_one_json_file(tmp_path):
    # Real processes: 4 writers each appending 40 items through read-modify-write, 2 readers reading all along.
    # No torn read, no FileNotFoundError, and no update lost (a lock beside the file serialises the writers).
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    url, stop = f"file://{tmp_path}/run/workers.json", tmp_path / "stop"
    readers = [subprocess.Popen([sys.executable, "-c", READ, url, str(stop)], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    writers = [subprocess.Popen([sys.executable, "-c", HAMMER, url, f"w{k}", "40"], env=env, text=True,
                                stderr=subprocess.PIPE) for k in range(4)]
    errors = [w.communicate(timeout=300)[1] for w in writers]
    stop.write_text("")
    results = [r.communicate(timeout=60) for r in readers]
    assert all(w.returncode == 0 for w in writers), errors
    for out, err in results:
        seen, bad = map(int, out.split())
        assert bad == 0 and seen > 0, err[-2000:]
    items = read_json(url)["items"]
    assert len(items) == 160 and len(set(items)) == 160
    assert sorted(os.listdir(tmp_path / "run")) == [".workers.json.lock", "workers.json"]  # no stray temporary


def test_hostile_concurrent_writers_on_s3_use_conditional_writes(s3_server):
    # S3 has no lock: each writer's PUT carries If-Match (If-None-Match when absent) and a loser retries.
    import threading

    url = f"{s3_server.bucket('rmw')}/runs/r/spend.json"
    opts = s3_server.storage_options
    errors = []

    def hammer(who: str) -> None:
        try:
            for i in range(15):
                update_json(url, lambda doc: {"items": ((doc or {}).get("items") or []) + [f"{who}-{i}"]}, opts)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=hammer, args=(f"w{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    items = read_json(url, opts)["items"]
    assert len(items) == 60 and len(set(items)) == 60
