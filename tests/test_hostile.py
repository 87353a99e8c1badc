"""Hostile input: an untrusted submitter in a shared namespace, a malicious file in shared storage,
a cluster answer that is not what llmctl wrote. One test per finding, each with the file or flag that the probe
used (crafted here: plan.json, tokenizer, parquet bomb, CORE bundle, annotation and log lines with escapes).
Every refusal is one line on stderr and exit 2 (cli/main.py); nothing is read outside the run.

The fuzz tests (hypothesis) are at the end: the argument parser, and the plan/tokenizer/checkpoint readers.
Run: .venv/bin/pytest tests/test_hostile.py -q
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cli.main import main
from tests.finished_run import tiny_plan

ROOT = Path(__file__).resolve().parents[1]
ESC = "\x1b]0;pwned\x07\x1b[2J\x9b31m"


def llmctl(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, *argv: str) -> str:
    """Run llmctl; it must refuse with one line on stderr (exit 2, no traceback). Returns that line."""
    rc, out, err = llmctl(capsys, *argv)
    assert rc == 2, (rc, out, err)
    assert err.count("\n") == 1 and err.startswith("llmctl: error: "), err
    return err


DRY = ("submit", "--depth", "12", "--gpus", "8", "--dry-run", "-o", "json", "--storage", "s3://bucket/llm")


@pytest.fixture(autouse=True)
def _no_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))


# ------------------------------------------------------------------ 2. --env overriding llmctl's variables

@pytest.mark.parametrize("pair", ["LLMCTL_RUN=victim-run", "AWS_ENDPOINT_URL=http://elsewhere", "HOME=/",
                                  "LLMCTL_NAMESPACE=other", "TMPDIR=/", "RAY_TMPDIR=/x", "AWS_REGION=x",
                                  "LD_PRELOAD=/tmp/x.so", "PYTHONPATH=/tmp"])
def test_env_cannot_replace_what_llmctl_sets(capsys, pair):
    err = refused(capsys, *DRY, "--env", pair)
    assert pair.split("=")[0] in err and "llmctl sets" in err


def test_env_that_llmctl_does_not_own_still_passes(capsys):
    rc, out, err = llmctl(capsys, *DRY, "--env", "NCCL_DEBUG=INFO", "--env", "NCCL_SOCKET_IFNAME=eth0")
    assert rc == 0, err
    env = {e["name"]: e.get("value") for e in json.loads(out)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
           ["spec"]["containers"][0]["env"]}
    assert env["NCCL_DEBUG"] == "INFO" and env["NCCL_SOCKET_IFNAME"] == "eth0" and env["HOME"] == "/tmp"


def test_cluster_config_env_is_held_to_the_same_rules(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("storageRoot: s3://bucket/llm\nenv:\n  LLMCTL_RUN: victim\n")
    err = refused(capsys, *DRY, "--cluster-config", str(cfg))
    assert "env.LLMCTL_RUN" in err


# ------------------------------------------------------------------ 3. credentials in the manifest

@pytest.mark.parametrize("name", ["WANDB_API_KEY", "DB_PASS", "HF_AUTH", "GITHUB_TOKEN", "MY_SECRET",
                                  "GOOGLE_APPLICATION_CREDENTIALS", "DB_PASSWORD"])
def test_credentials_by_name_are_refused(capsys, name):
    err = refused(capsys, *DRY, "--env", f"{name}=x")
    assert name in err and "Secret" in err


@pytest.mark.parametrize("value", [
    "AKIAIOSFODNN7EXAMPLE", "ghp_" + "a1B2" * 9, "hf_" + "AbCd" * 9, "xoxb-1234567890-abcdefghij",
    "-----BEGIN RSA PRIVATE KEY-----", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig",
    "https://user:token@example.com/x", "sk-" + "x" * 40])
def test_credentials_by_value_are_refused(capsys, value):
    err = refused(capsys, *DRY, "--env", f"NCCL_NOTE={value}")
    assert ("NCCL_NOTE" in err or "--env" in err) and "Secret" in err and value not in err


@pytest.mark.parametrize("flag", ["--storage", "--core-bundle"])
def test_urls_with_user_and_password_are_refused(capsys, flag):
    url = "https://user:s3cr3t@host.example/llm"
    argv = [a for a in DRY if a not in ("--storage", "s3://bucket/llm")] if flag == "--storage" else list(DRY)
    err = refused(capsys, *argv, flag, url)
    assert "s3cr3t" not in err and "Secret" in err


def test_plan_refuses_a_credential_url_too(capsys):
    err = refused(capsys, "plan", "--depth", "12", "--storage", "s3://AKIAIOSFODNN7EXAMPLE:x@bucket/llm")
    assert "storage" in err and "AKIAIOSFODNN7EXAMPLE" not in err


def test_spec_refuses_credentials_in_its_urls():  # a plan built by a library call, or a plan.json
    from trainer.plan import PlanError, RunSpec

    with pytest.raises(PlanError, match="storage_root"):
        RunSpec(depth=4, storage_root="s3://bucket/x?token=ghp_" + "a1B2" * 9)
    with pytest.raises(PlanError, match="core_bundle"):
        RunSpec(depth=4, core_bundle="https://u:p@host/bundle")


def test_cluster_config_endpoint_and_storage_with_credentials_are_refused(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("storageRoot: s3://bucket/llm\ns3:\n  endpoint: https://minio:pw@minio.local:9000\n")
    assert "s3.endpoint" in refused(capsys, *DRY, "--cluster-config", str(cfg))


def test_data_commands_refuse_credential_urls(capsys):
    err = refused(capsys, "data", "sample", "--out", "s3://k:v@bucket/data/sample")
    assert "k:v@" not in err


# ------------------------------------------------------------------ 4. stored plan.json pointing outside the run

def _store(url_root: Path, name: str, doc: dict) -> Path:
    run = url_root / "runs" / name
    run.mkdir(parents=True, exist_ok=True)
    (run / "plan.json").write_text(json.dumps(doc))
    return run


def _plan_doc(root: Path, name: str = "evil", **over) -> dict:
    return json.loads(tiny_plan(f"file://{root}", name, **over).to_json())


def test_report_refresh_does_not_follow_a_stage_name_out_of_the_run(capsys, tmp_path):
    private = tmp_path / "private" / "team-b"
    private.mkdir(parents=True)
    (private / "summary.json").write_text(json.dumps({"status": "completed", "secret": "TEAM-B-MARKER"}))
    doc = _plan_doc(tmp_path)
    doc["stages"][0]["name"] = "../../private/team-b"
    run = _store(tmp_path, "evil", doc)
    err = refused(capsys, "report", "evil", "--refresh", "--storage", f"file://{tmp_path}")
    assert "stages" in err and "../../private/team-b" in err and "TEAM-B-MARKER" not in err
    assert not any("TEAM-B-MARKER" in p.read_text() for p in run.iterdir())


def test_chat_does_not_follow_a_tokenizer_url_out_of_the_storage_root(capsys, tmp_path):
    other = tmp_path / "elsewhere" / "tok"
    other.mkdir(parents=True)
    (other / "tokenizer.json").write_text(json.dumps({"format": "OTHER-FILE-MARKER"}))
    doc = _plan_doc(tmp_path / "store")
    doc["urls"]["tokenizer"] = f"file://{other}"
    _store(tmp_path / "store", "evil", doc)
    err = refused(capsys, "chat", "evil", "--storage", f"file://{tmp_path}/store", "--prompt", "hi")
    assert "urls.tokenizer" in err and "OTHER-FILE-MARKER" not in err


def test_chat_rederives_the_tokenizer_under_the_root_it_opened(tmp_path):
    from trainer.plan.urls import rebase, storage_root_of

    doc = _plan_doc(tmp_path / "old")
    root = storage_root_of(f"s3://new/prefix/runs/{doc['name']}")
    assert rebase(doc["urls"]["tokenizer"], doc["spec"]["storage_root"], root, "tokenizers", "t") \
        == "s3://new/prefix/tokenizers/sample-512"


def test_core_bundle_dataset_uri_cannot_leave_the_bundle(tmp_path):
    from trainer import evaluate as ev

    (tmp_path / "secret.jsonl").write_text(json.dumps({"context": "OUTSIDE", "continuation": "x"}) + "\n")
    bundle = tmp_path / "bundle"
    (bundle / "eval_data").mkdir(parents=True)
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nt,0\n")
    for uri in ("../../secret.jsonl", "/etc/passwd", "s3://other/x.jsonl"):
        (bundle / "core.yaml").write_text(f"icl_tasks:\n- label: t\n  dataset_uri: {json.dumps(uri)}\n"
                                          "  icl_task_type: language_modeling\n  num_fewshot: [0]\n")
        with pytest.raises(ev.BundleError, match="dataset_uri"):
            ev.load_bundle(f"file://{bundle}")


# ------------------------------------------------------------------ 5. memory bombs and tracebacks

def test_chat_checks_the_model_shape_before_allocating(capsys, tmp_path):
    doc = _plan_doc(tmp_path)
    doc["arch"]["n_embd"] = 131072
    _store(tmp_path, "big", doc)
    err = refused(capsys, "chat", "big", "--storage", f"file://{tmp_path}", "--prompt", "hi")
    assert "arch.n_embd" in err


def test_chat_refuses_a_vocab_the_planner_cannot_make(capsys, tmp_path):
    doc = _plan_doc(tmp_path)
    doc["arch"]["vocab_size"] = doc["arch"]["padded_vocab_size"] = 2**31
    _store(tmp_path, "big", doc)
    assert "arch.vocab_size" in refused(capsys, "chat", "big", "--storage", f"file://{tmp_path}", "--prompt", "hi")


@pytest.fixture(scope="module")
def tok():
    from trainer.data.tokenizer import Tokenizer

    words = [f"w{i} x{i % 7} the quick brown fox {i}" for i in range(300)]
    return Tokenizer.train(words, 300)


def _tamper(tmp_path, tok, *, ranks: bytes | None = None, meta_edit=None) -> str:
    from trainer.data.tokenizer import BYTES_FILE, META_FILE, RANKS_FILE

    url = str(tmp_path / "tok")
    tok.save(url)
    d = Path(url)
    if ranks is not None:
        (d / RANKS_FILE).write_bytes(ranks)
    meta = json.loads((d / META_FILE).read_text())
    meta["sha256"][RANKS_FILE] = hashlib.sha256((d / RANKS_FILE).read_bytes()).hexdigest()
    meta["sha256"][BYTES_FILE] = hashlib.sha256((d / BYTES_FILE).read_bytes()).hexdigest()
    if meta_edit:
        meta_edit(meta)
    (d / META_FILE).write_text(json.dumps(meta))
    return url


def _run_limited(code: str, mem_bytes: int = 3 << 30) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python with its address space capped: a bomb fails there, not on this machine."""
    pre = f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({mem_bytes}, {mem_bytes}))\n"
    return subprocess.run([sys.executable, "-c", pre + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_tokenizer_rank_bomb_is_a_tokenizer_error(tmp_path, tok):
    from trainer.data.tokenizer import RANKS_FILE

    url = _tamper(tmp_path, tok)
    ranks = (Path(url) / RANKS_FILE).read_bytes().splitlines()
    ranks[-1] = ranks[-1].split()[0] + b" 4000000000"
    url = _tamper(tmp_path, tok, ranks=b"\n".join(ranks) + b"\n",  # and a tokenizer.json that agrees
                  meta_edit=lambda m: m.update(vocab_size=4_000_000_001 + len(m["special_tokens"])))
    r = _run_limited(f"""
        from trainer.data.tokenizer import Tokenizer, TokenizerError
        try:
            Tokenizer.load({url!r})
        except TokenizerError as e:
            print("TokenizerError:", e)
    """)
    assert r.returncode == 0 and "TokenizerError" in r.stdout and "rank" in r.stdout, (r.stdout, r.stderr[-2000:])


@pytest.mark.parametrize("case", ["malformed", "bad-base64", "no-sha256", "not-json", "pattern"])
def test_bad_tokenizer_files_are_tokenizer_errors(tmp_path, tok, case):
    from trainer.data.tokenizer import META_FILE, Tokenizer, TokenizerError

    if case == "malformed":
        url = _tamper(tmp_path, tok, ranks=b"AAA= 0\nthis line has three words\n")
    elif case == "bad-base64":
        url = _tamper(tmp_path, tok, ranks=b"%%%% 0\n")
    elif case == "no-sha256":
        url = _tamper(tmp_path, tok, meta_edit=lambda m: m.pop("sha256"))
    elif case == "pattern":
        url = _tamper(tmp_path, tok, meta_edit=lambda m: m.update(pattern="(a+)+$"))
    else:
        url = _tamper(tmp_path, tok)
        (Path(url) / META_FILE).write_text("{not json")
    with pytest.raises(TokenizerError):
        Tokenizer.load(url)


def _bomb_shard(path: Path, doc_chars: int, n_docs: int = 1) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": ["a" * doc_chars] * n_docs}), path / "shard_00000.parquet",
                   compression="zstd", use_dictionary=False)
    return f"file://{path}/shard_00000.parquet"


def test_parquet_row_group_size_is_read_from_metadata_before_decoding(tmp_path, monkeypatch):
    from trainer.data import shards

    url = _bomb_shard(tmp_path / "d", 4 << 20)  # 4 MB of 'a': a few hundred compressed bytes
    assert (tmp_path / "d" / "shard_00000.parquet").stat().st_size < 64 << 10
    monkeypatch.setattr(shards, "MAX_ROW_GROUP_BYTES", 1 << 20, raising=False)
    reader = shards.ShardReader([url], {}, retries=1, backoff=0, on_retry=None)
    reader.footer(0)  # the footer is metadata only; decoding the row group is what must not happen
    decoded = []
    monkeypatch.setattr(reader, "_decode", lambda *a, **k: decoded.append(1) or [""])
    with pytest.raises(shards.ShardError, match="uncompressed"):
        reader.read_row_group(0, 0)
    assert not decoded


def test_documents_are_capped(tmp_path, monkeypatch):
    from trainer.data import shards

    url = _bomb_shard(tmp_path / "d", 5000, n_docs=3)
    monkeypatch.setattr(shards, "MAX_DOC_CHARS", 1000, raising=False)
    texts = shards.ShardReader([url], {}, retries=1, backoff=0, on_retry=None).read_row_group(0, 0)
    assert [len(t) for t in texts] == [1000] * 3


def test_default_bounds_fit_the_reference_layout():
    from trainer.data import shards

    # a reference row group: 1024 documents; ClimbMix documents average a few KB
    assert shards.MAX_ROW_GROUP_BYTES >= 64 * 1024 * 1024 and shards.MAX_DOC_CHARS >= 1 << 20


class _Args:
    max_tokens = 32


def _session(tok, seq_len: int):
    from cli.chat import Session

    s = Session.__new__(Session)
    s.args, s.tokenizer, s.chat, s.history = _Args(), tok, True, []
    s.plan = {"arch": {"seq_len": seq_len}}
    return s


@pytest.mark.parametrize("factor", [2, 20])
def test_chat_prompt_longer_than_the_context_is_one_line(tok, factor):
    from cli.errors import UsageError

    s = _session(tok, 64)
    with pytest.raises(UsageError, match="context"):
        s.prompt_ids("word " * 64 * factor)


def test_chat_reply_stops_at_the_context(tok):
    s = _session(tok, 64)
    ids = s.prompt_ids("hello there")
    assert s.reply_budget(ids) == _Args.max_tokens  # room for the whole reply
    s.args = type("A", (), {"max_tokens": 1000})()
    assert len(ids) + s.reply_budget(ids) == 64  # the reply is cut at the trained context


@pytest.mark.parametrize("argv", [
    ("plan", "--depth", "12", "--ratio", "1e300"),
    ("plan", "--depth", "12", "--ratio", "nan"),
    ("plan", "--depth", "12", "--price", "inf", "-o", "json"),
    ("plan", "--depth", "12", "--price", "nan", "-o", "json"),
    ("plan", "--depth", "12", "--max-cost", "inf"),
    ("plan", "--depth", "12", "--num-iterations", "100000000000000000000"),
    ("plan", "--depth", "12", "--seq-len", str(1 << 40)),
    ("plan", "--depth", "12", "--total-batch-size", str(1 << 62)),
    (*DRY, "--num-iterations", "100000000000000000000"),
])
def test_numbers_that_overflow_or_are_not_finite_are_refused(capsys, argv):
    refused(capsys, *argv)


def test_active_deadline_fits_int64_for_the_largest_plan(capsys):
    rc, out, err = llmctl(capsys, *DRY, "--num-iterations", "1000000000", "--depth", "64", "--gpus", "8")
    if rc == 0:
        assert json.loads(out)["spec"]["activeDeadlineSeconds"] < 2**63
    else:
        assert rc == 2 and err.count("\n") == 1


def test_plan_json_is_strict_json(capsys):
    rc, out, _ = llmctl(capsys, "plan", "--depth", "12", "--price", "0", "-o", "json")
    assert rc == 0
    json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in -o json"))


# ------------------------------------------------------------------ 6. terminal escapes from the cluster/storage

@pytest.fixture
def kube(tmp_path, monkeypatch):
    from tests.kube_fake import FakeKube

    with FakeKube() as k:
        monkeypatch.setenv("KUBECONFIG", str(k.kubeconfig(tmp_path / "kubeconfig")))
        yield k


def _rayjob(kube, capsys, annotations: dict, status: dict | None = None) -> str:
    assert llmctl(capsys, "submit", "--depth", "12", "--gpus", "8", "--yes", "--storage", "s3://b/x")[0] == 0
    ((_, _, name),) = [k for k in kube.objects if k[0] == "rayjobs"]
    rj = kube.get("rayjobs", "team", name)
    rj["metadata"]["annotations"].update(annotations)
    rj["status"] = status or {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED",
                              "message": f"done{ESC}", "startTime": "2026-01-01T00:00:00Z",
                              "endTime": "2026-01-01T01:00:00Z"}
    kube.objects[("rayjobs", "team", name)] = rj
    return name


def _no_controls(text: str) -> None:
    bad = [c for c in text if (ord(c) < 32 and c not in "\n\t") or 0x7f <= ord(c) <= 0x9f]
    assert not bad, repr(text)


def test_status_strips_escapes_from_annotations_and_messages(kube, capsys):
    name = _rayjob(kube, capsys, {"llmctl.dev/progress": json.dumps(
        {"stage": f"pretrain{ESC}", "step": 1, "steps": 2, "updated": ESC}), "llmctl.dev/storage": f"s3://x{ESC}"})
    rc, out, err = llmctl(capsys, "status", name)
    assert rc == 0, err
    _no_controls(out + err)
    # Progress is read from the run's storage now (the annotation is ignored); the storage annotation still
    # reaches the storage row and the could-not-read warning, and an OSC title is dropped whole there.
    assert "s3://x" in out and "pwned" not in out + err


def test_status_json_is_strict_and_survives_odd_annotations(kube, capsys):
    name = _rayjob(kube, capsys, {"llmctl.dev/estimate-dollars": "nan", "llmctl.dev/progress": "[1, 2]"})
    rc, out, err = llmctl(capsys, "status", name, "-o", "json")
    assert rc == 0, err
    json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in -o json"))
    rc, out, err = llmctl(capsys, "status", name)
    assert rc == 0, err


def test_list_strips_escapes(kube, capsys):
    _rayjob(kube, capsys, {}, {"jobDeploymentStatus": f"Running{ESC}", "message": ESC})
    rc, out, err = llmctl(capsys, "list")
    assert rc == 0, err
    _no_controls(out + err)


def test_logs_strip_escapes_but_keep_the_text(kube, capsys):
    kube.add({"apiVersion": "v1", "kind": "Pod",
              "metadata": {"name": "r1-s", "creationTimestamp": "2026-01-01T00:00:00Z",
                           "labels": {"llmctl.dev/run": "r1", "llmctl.dev/role": "submitter"}},
              "spec": {"containers": [{"name": "ray-job-submitter", "image": "x"}]}},
             log=f"step 1{ESC}\nstep\t2\r\n")
    rc, out, err = llmctl(capsys, "logs", "r1")
    assert rc == 0, err
    _no_controls(out)
    assert out == "step 1\nstep\t2\n"


def test_report_and_errors_strip_escapes_from_stored_files(capsys, tmp_path):
    doc = _plan_doc(tmp_path)
    doc["estimate"]["mfu_source"] = f"prior{ESC}"
    _store(tmp_path, "evil", doc)
    rc, out, err = llmctl(capsys, "report", "evil", "--storage", f"file://{tmp_path}")
    assert rc == 0, err
    _no_controls(out + err)
    doc["name"] = f"x{ESC}"
    doc["stages"] = [s for s in doc["stages"] if s["name"] != "sft"]
    _store(tmp_path, "evil2", doc)
    err = refused(capsys, "chat", "evil2", "--storage", f"file://{tmp_path}", "--prompt", "hi")
    _no_controls(err)


def test_clean_drops_sequences_whole():
    from cli.console import clean

    assert clean(f"a{ESC}b\r\n\tc", newlines=True) == "ab\n\tc"
    assert clean("x\n\ty") == "xy"  # one line by default
    assert clean("\u202eevil") == "evil"
    assert clean("a\u200bb\u2028c", newlines=True) == "abc"  # zero-width and line separators: not printable
    assert clean("\x1b]0;title\x07name", limit=3) == "nam"  # the sequence goes whole, then the limit


# ------------------------------------------------------------------ 7. storage that is not shared

@pytest.mark.parametrize("storage", ["/mnt/local", "local:///x", "FILE:///x", "memory://x", "file:///x"])
def test_cluster_runs_need_shared_storage(capsys, storage):
    argv = [a for a in DRY if a not in ("--storage", "s3://bucket/llm")]
    err = refused(capsys, *argv, "--storage", storage)
    assert "shared" in err


@pytest.mark.parametrize("storage", ["s3://b/x", "gs://b/x", "az://c/x", "abfs://c/x"])
def test_shared_protocols_pass(capsys, storage):
    argv = [a for a in DRY if a not in ("--storage", "s3://bucket/llm")]
    rc, _, err = llmctl(capsys, *argv, "--storage", storage)
    assert rc == 0, err


def test_core_bundle_of_a_cluster_run_is_shared_too(capsys):
    assert "shared" in refused(capsys, *DRY, "--core-bundle", "file:///data/bundle")


def test_spec_names_that_become_paths_are_plain(capsys):
    from trainer.plan import PlanError, RunSpec

    for field in ("tokenizer", "dataset", "sft_dataset"):
        with pytest.raises(PlanError, match=field):
            RunSpec(depth=4, **{field: "../../team-b"})


# ------------------------------------------------------------------ 8. Pod Security on the namespace

def _helm(*args: str) -> tuple[list[dict], str]:
    from tests import schemas
    from tests.tools import ensure_helm

    chart = ROOT / "charts" / "llmctl"
    out = subprocess.run([str(ensure_helm()), "template", "r", str(chart), "-n", "team", *args],
                         capture_output=True, text=True, check=True).stdout
    notes = subprocess.run([str(ensure_helm()), "install", "r", str(chart), "-n", "team", "--dry-run=client",
                            *args], capture_output=True, text=True)
    return schemas.load_yaml_stream(out), notes.stdout


def test_chart_labels_the_namespace_it_creates_for_restricted_pod_security():
    docs, _ = _helm("--set", "namespace.create=true")
    (ns,) = [d for d in docs if d["kind"] == "Namespace"]
    assert ns["metadata"]["name"] == "team"
    labels = ns["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"


def test_chart_in_an_existing_namespace_prints_the_label_command():
    docs, notes = _helm()
    assert not [d for d in docs if d["kind"] == "Namespace"]
    assert "kubectl label namespace team pod-security.kubernetes.io/enforce=restricted" in notes


def test_doctor_checks_the_pod_security_label(tmp_path, monkeypatch, capsys):
    from tests.kube_fake import FakeKube

    with FakeKube() as kube:
        monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path / "kc", token=kube.token)))
        main(["doctor"])
        line = next(ln for ln in capsys.readouterr().out.splitlines() if ln[2:].startswith("namespace"))
        assert line.startswith("!") and "kubectl label namespace team pod-security.kubernetes.io/enforce=restricted" \
            in line, line
        kube.namespace_labels["team"] = {"pod-security.kubernetes.io/enforce": "restricted"}
        main(["doctor"])
        line = next(ln for ln in capsys.readouterr().out.splitlines() if ln[2:].startswith("namespace"))
        assert line.startswith("✓") and "restricted enforced" in line, line


def test_security_doc_exists_and_says_the_run_account_needs_no_rayjob_write():
    text = (ROOT / "docs" / "security.md").read_text()
    for part in ("Threat model", "untrusted submitter", "malicious file", "compromised pod", "operator"):
        assert part.lower() in text.lower(), part
    assert "RayJob" in text and "no write" in text.lower()


@pytest.mark.parametrize("value, message", [
    ("config.env.WANDB_API_KEY=x", "looks like a credential"),
    ("config.env.LLMCTL_RUN=x", "is set by llmctl"),
    ("config.env.NCCL_NOTE=AKIAIOSFODNN7EXAMPLE", "its value looks like a credential"),
    ("config.storageRoot=https://user:pw@host/x", "user:password"),
    ("config.s3.endpoint=http://user:pw@minio:9000", "user:password"),
    ("config.storageRoot=memory://x", "shared storage"),
    ("config.storageRoot=FILE:///x", "storageRoot"),  # the values schema already refuses it
])
def test_chart_values_follow_the_same_rules(value, message):
    from tests.tools import ensure_helm

    res = subprocess.run([str(ensure_helm()), "template", "r", str(ROOT / "charts" / "llmctl"), "-n", "team",
                          "--set", value], capture_output=True, text=True)
    assert res.returncode != 0 and message in res.stderr and "pw@" not in res.stderr, res.stderr


# ------------------------------------------------------------------ fuzz (hypothesis): the parser and the readers
# Generated argument lists for `plan` and `submit --dry-run` in-process (exit 0 or 2, one line, strict JSON), and
# generated plan.json, tokenizer and checkpoint files read by the real readers in a child process whose address
# space is capped at READER_HEADROOM above what the imports took: a reader that tried to allocate for a bomb fails
# there with MemoryError, and any exception other than the reader's own error type is a traceback that fails the
# test. The cap is set after the imports, relative to them: torch's CUDA build (PyPI's default) maps over 3 GiB of
# address space on import alone, its CPU build about 1 GiB, and the bound must hold on either.

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

READER_HEADROOM = 1 << 30  # address space a reader may add to the imports' own; a bomb needs far more
_NUM = st.one_of(st.integers(-2, 2**70).map(str), st.sampled_from(["1e300", "nan", "inf", "-inf", "-0", "1e-320",
                                                                    "0x10", "", " 3", "1_000"]),
                 st.floats(allow_nan=True, allow_infinity=True).map(repr))
_TEXT = st.one_of(st.text(max_size=30), st.sampled_from([
    "s3://b/x", "file:///tmp/x", "https://u:p@h/x", "memory://x", "FILE:///x", "../../x", ESC, "AKIAIOSFODNN7EXAMPLE",
    "pretrain,sft,eval", "eval", "sft,pretrain", "h100", "cpu", "NCCL_DEBUG=INFO", "HOME=/", "A=B=C", "="]))
_FLAGS = {"--depth": _NUM, "--ratio": _NUM, "--gpus": _NUM, "--seq-len": _NUM, "--num-iterations": _NUM,
          "--device-batch-size": _NUM, "--total-batch-size": _NUM, "--price": _NUM, "--max-cost": _NUM,
          "--core-max-per-task": _NUM, "--stages": _TEXT, "--gpu-type": _TEXT, "--storage": _TEXT,
          "--core-bundle": _TEXT, "--name": _TEXT, "--precision": _TEXT, "--env": _TEXT, "--image": _TEXT,
          "--queue": _TEXT}


@st.composite
def _argv(draw):
    cmd = draw(st.sampled_from(["plan", "submit"]))
    argv = [cmd, "--depth", draw(st.sampled_from(["4", "12", "20", "64"]))]
    for flag in draw(st.lists(st.sampled_from(sorted(_FLAGS)), max_size=5)):
        argv += [flag, draw(_FLAGS[flag])]
    argv += ["-o", "json"] + (["--dry-run"] if cmd == "submit" else [])
    return argv


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(argv=_argv())
def test_fuzz_the_argument_parser(argv, tmp_path):
    import contextlib
    import io
    import os

    os.environ["KUBECONFIG"] = str(tmp_path / "absent")  # (the autouse fixture's value, kept per example)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    assert rc in (0, 2), (argv, rc, err.getvalue())
    if rc == 2:
        assert err.getvalue().count("\n") == 1 and "Traceback" not in err.getvalue(), (argv, err.getvalue())
        _no_controls(err.getvalue())
    else:
        json.loads(out.getvalue(), parse_constant=lambda c: pytest.fail(f"{c} in -o json for {argv}"))


def test_fuzz_the_readers_with_bounded_memory():
    r = subprocess.run([sys.executable, "-c", "from tests.test_hostile import fuzz_readers; fuzz_readers()"],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert r.returncode == 0 and "readers fuzzed" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats() | st.text(max_size=20)
                     | st.sampled_from(["../../x", "file:///etc", ESC, "s3://other/tokenizers/t"]),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=8)


def _mutate(doc, path: tuple, value):
    node = doc
    for k in path[:-1]:
        node = node[k] if isinstance(node, dict) and k in node else None
        if node is None:
            return doc
    if isinstance(node, dict):
        node[path[-1]] = value
    return doc


def fuzz_readers() -> None:  # runs in the capped child process (test_fuzz_the_readers_with_bounded_memory)
    import io
    import os
    import tempfile
    import contextlib

    import torch

    from trainer import checkpoint
    from trainer.plan import stored_plan as stored
    from trainer.plan import PlanError, RunPlan
    from trainer.data.tokenizer import BYTES_FILE, META_FILE, RANKS_FILE, Tokenizer, TokenizerError

    import resource

    vm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + READER_HEADROOM, vm + READER_HEADROOM))  # after the imports
    base = tempfile.mkdtemp()
    good = _plan_doc(Path(base) / "root", "fz")
    plan_paths = [("arch", k) for k in good["arch"]] + [("spec", k) for k in good["spec"]] + [
        ("stages",), ("urls", "tokenizer"), ("name",), ("schema",), ("estimate", "mfu_source"), ("stages", 0)]

    @settings(max_examples=50, deadline=None, database=None)
    @given(path=st.sampled_from(plan_paths), value=_JSON)
    def plan_reader(path, value):
        doc = json.loads(json.dumps(good))
        if path == ("stages", 0):
            doc["stages"][0] = value
        else:
            _mutate(doc, path, value)
        text = json.dumps(doc)
        with contextlib.suppress(PlanError):
            RunPlan.from_json(text)
        for check in (stored.architecture, stored.stage_names,
                      lambda d: stored.tokenizer_url(d, f"file://{base}/root/runs/fz")):
            with contextlib.suppress(stored.StoredPlanError):
                check(doc)
        run = Path(base) / "root" / "runs" / "fz"
        run.mkdir(parents=True, exist_ok=True)
        (run / "plan.json").write_text(text)
        for argv in (["report", "fz", "--refresh"], ["chat", "fz", "--prompt", "hi"]):
            err = io.StringIO()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
                rc = main([*argv, "--storage", f"file://{base}/root"])
            assert rc in (0, 2) and "Traceback" not in err.getvalue(), (argv, path, value, err.getvalue())

    tok = Tokenizer.train([f"w{i} x{i % 7} the quick brown fox {i}" for i in range(300)], 300)
    tok_url = f"{base}/tok"
    tok.save(tok_url)
    files = {f: (Path(tok_url) / f).read_bytes() for f in (RANKS_FILE, BYTES_FILE, META_FILE)}
    lines = files[RANKS_FILE].splitlines()

    @settings(max_examples=60, deadline=None, database=None)
    @given(i=st.integers(0, len(lines) - 1), line=st.binary(max_size=40) | st.sampled_from(
        [b"AAA= 4000000000", b"AAA=", b"AAA= -1", b"AAA= 1 2", b"!!!! 3", b"QQ== 99999999999999999999"]),
        meta_key=st.sampled_from(["sha256", "pattern", "vocab_size", "special_tokens", "format", "name", None]),
        meta_value=_JSON, resum=st.booleans())
    def tokenizer_reader(i, line, meta_key, meta_value, resum):
        d = Path(tempfile.mkdtemp(dir=base))
        ranks = b"\n".join([*lines[:i], line, *lines[i + 1:]]) + b"\n"
        meta = json.loads(files[META_FILE])
        if resum:
            meta["sha256"][RANKS_FILE] = hashlib.sha256(ranks).hexdigest()
        if meta_key:
            meta[meta_key] = meta_value
        (d / RANKS_FILE).write_bytes(ranks)
        (d / BYTES_FILE).write_bytes(files[BYTES_FILE])
        (d / META_FILE).write_text(json.dumps(meta))
        with contextlib.suppress(TokenizerError):
            Tokenizer.load(str(d))

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    weights = buf.getvalue()
    good_meta = {"format": checkpoint.FORMAT, "step": 3, "stage": "sft", "world_size": 1, "run": "fz",
                 "loop_state": {}, "files": [checkpoint.MODEL_FILE]}

    @settings(max_examples=40, deadline=None, database=None)
    @given(key=st.sampled_from(sorted(good_meta) + [None]), value=_JSON | st.just(["../../../etc/passwd"]),
           model=st.sampled_from([weights, b"", b"PK\x03\x04junk", weights[: len(weights) // 2]]) | st.binary(max_size=64),
           raw=st.none() | st.text(max_size=40))
    def checkpoint_reader(key, value, model, raw):
        stage = Path(tempfile.mkdtemp(dir=base)) / "sft"
        d = stage / checkpoint.dir_name("sft", 3)
        d.mkdir(parents=True)
        meta = dict(good_meta, **({key: value} if key else {}))
        (d / checkpoint.META_FILE).write_text(raw if raw is not None else json.dumps(meta))
        (d / checkpoint.MODEL_FILE).write_bytes(model)
        found = checkpoint.latest(str(stage))
        if found is not None:
            with contextlib.suppress(checkpoint.CheckpointError):
                checkpoint.load_model_state(found)

    os.environ["KUBECONFIG"] = f"{base}/absent"
    plan_reader()
    tokenizer_reader()
    checkpoint_reader()
    print("readers fuzzed")
