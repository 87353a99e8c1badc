"""trainer/serve/app.py and trainer/serve/openai_api.py: the OpenAI-compatible API on Ray Serve, through the official openai client.

The app is the one `llmctl serve --local` runs, on the local Ray cluster, serving a tiny freshly initialised
run (tests/serve_app.py `served`, shared with tests/serve/test_page.py). The last test serves the run the
suite trained (tests/finished_run.py) end to end through the CLI in a child process.
Run: .venv/bin/pytest tests/serve/test_app.py
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.serve_app import free_port

ROOT = Path(__file__).resolve().parents[2]


def client(served, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kw)


def post(served, path: str, body: bytes, content_type="application/json") -> tuple[int, dict | str]:
    req = urllib.request.Request(served.url + path, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            text = r.read().decode()
            return r.status, (json.loads(text) if r.headers.get_content_type() == "application/json" else text)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat_body(**kw) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "Hello there"}], **kw}).encode()


# ---------------------------------------------------------------------------------------------
# The openai client, unmodified


def test_models_lists_the_run(served):
    models = client(served).models.list()
    assert [m.id for m in models.data] == [served.model]
    assert served.get("/healthz")["status"] == "ok"


def test_chat_completion(served):
    r = client(served).chat.completions.create(model=served.model, max_tokens=12, temperature=0.0,
                                               messages=[{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": "What is Ray Serve?"}])
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert "<|" not in choice.message.content
    again = client(served).chat.completions.create(model=served.model, max_tokens=12, temperature=0.0,
                                                   messages=[{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "What is Ray Serve?"}])
    assert again.choices[0].message.content == choice.message.content  # greedy is deterministic


def test_chat_streaming_equals_the_whole_reply(served):
    kw = dict(model=served.model, max_tokens=24, temperature=0.0, messages=[{"role": "user", "content": "Hi!"}])
    whole = client(served).chat.completions.create(**kw).choices[0].message.content
    chunks = list(client(served).chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole
    assert sum(1 for c in chunks if c.choices[0].delta.content) > 1  # streamed, not one blob
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_ends_with_done(served):
    status, text = post(served, "/v1/chat/completions", chat_body(stream=True, max_tokens=5))
    assert status == 200
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_and_sampling_controls(served):
    c = client(served)
    r = c.completions.create(model=served.model, prompt="The quick brown fox", max_tokens=10, temperature=0.0)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    streamed = c.completions.create(model=served.model, prompt="The quick brown fox", max_tokens=10,
                                    temperature=0.0, stream=True)
    assert "".join(x.choices[0].text for x in streamed) == r.choices[0].text
    # seeds make sampling repeatable; top_k rides in the body as the extension field it is
    a, b = (c.chat.completions.create(model=served.model, max_tokens=16, temperature=1.0, seed=7,
                                      extra_body={"top_k": 5}, messages=[{"role": "user", "content": "Go"}])
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


# ---------------------------------------------------------------------------------------------
# Bad input: a 4xx JSON error, and the server carries on


def test_unknown_model_is_404_through_the_client(served):
    with pytest.raises(openai.NotFoundError) as e:
        client(served).chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (chat_body(max_tokens=0), 400, "invalid_value"),
    (chat_body(max_tokens=10_000), 400, "invalid_value"),
    (chat_body(temperature=3), 400, "invalid_value"),
    (chat_body(top_k=0), 400, "invalid_value"),
    (chat_body(stream="yes"), 400, "invalid_value"),
    (chat_body(n=2), 400, "invalid_value"),
    (json.dumps({"messages": []}).encode(), 400, "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}).encode(),
     400, "invalid_value"),
    (json.dumps({"messages": [{"role": "wizard", "content": "a"}]}).encode(), 400, "invalid_value"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 400}]}).encode(), 400,
     "context_length_exceeded"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode(), 413, "request_too_large"),
])
def test_bad_requests_get_a_json_error(served, body, status, code):
    got, answer = post(served, "/v1/chat/completions", body)
    assert got == status and answer["error"]["code"] == code and answer["error"]["message"]


def test_bad_completions_and_unknown_paths(served):
    assert post(served, "/v1/completions", json.dumps({"prompt": ""}).encode())[0] == 400
    assert post(served, "/v1/completions", json.dumps({"prompt": "word " * 400}).encode())[1]["error"]["code"] == \
        "context_length_exceeded"
    status, answer = post(served, "/v1/embeddings", b"{}")
    assert status == 404 and "error" in answer
    assert served.get("/healthz")["status"] == "ok"  # still up after all of the above


def test_long_conversations_drop_their_oldest_turns(served):
    turns = []
    for i in range(12):  # ~12 x 2 x 10 tokens: far past the 128-token context
        turns += [{"role": "user", "content": f"question {i} about the fox and the dog"},
                  {"role": "assistant", "content": f"answer {i} about the fox and the dog"}]
    r = client(served).chat.completions.create(model=served.model, max_tokens=8, temperature=0.0,
                                               messages=[*turns, {"role": "user", "content": "and now?"}])
    assert r.usage.prompt_tokens + 8 <= 128


# ---------------------------------------------------------------------------------------------
# Concurrency: requests share decode steps


def test_concurrent_requests_share_decode_steps(served):
    before = served.get("/healthz")["engine"]
    n, max_tokens = 4, 60

    def one(i):
        r = client(served).completions.create(model=served.model, prompt=f"Request {i}: the fox", temperature=0.0,
                                              max_tokens=max_tokens)
        return r.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        tokens = list(pool.map(one, range(n)))
    after = served.get("/healthz")["engine"]
    steps, rows = after["steps"] - before["steps"], after["rows"] - before["rows"]
    assert rows == sum(tokens) - n  # every token but each prefill's came out of a shared decode step
    assert after["max_rows"] >= 2
    assert steps < rows, f"{steps} decode steps for {rows} rows: requests were decoded one at a time"


# ---------------------------------------------------------------------------------------------
# Metrics


def test_metrics_are_exported(served):
    client(served).chat.completions.create(model=served.model, max_tokens=4,
                                           messages=[{"role": "user", "content": "count me"}])
    post(served, "/v1/chat/completions", b"{bad")
    port = served.get("/healthz")["metrics_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}

    def value(name, **labels):
        return samples.get((name, tuple(sorted({"run": served.model, **labels}.items()))))

    assert value("llmctl_serve_requests_total", code="200") >= 1
    assert value("llmctl_serve_requests_total", code="400") >= 1
    assert value("llmctl_serve_tokens_total") >= 4
    assert value("llmctl_serve_time_to_first_token_seconds_count") >= 1
    assert value("llmctl_serve_queue_depth") == 0
    assert value("llmctl_serve_active_requests") == 0


# ---------------------------------------------------------------------------------------------
# End to end: `llmctl serve --local` on the run the suite trained


def test_llmctl_serve_local_on_the_finished_run(finished_run):
    full = finished_run
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS="")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", full.urls["run"], "--local", "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        ready = None
        for line in proc.stdout:  # run_local prints one JSON line once the app is ready
            if line.startswith("{"):
                ready = json.loads(line)
                break
        assert ready and ready["event"] == "ready", proc.stderr.read()[-3000:]
        c = openai.OpenAI(base_url=ready["api"], api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list().data] == [full.name]
        r = c.chat.completions.create(model=full.name, max_tokens=16, temperature=0.0,
                                      messages=[{"role": "user", "content": "What does the json module do?"}])
        assert r.choices[0].finish_reason in ("stop", "length") and "<|" not in r.choices[0].message.content
        with urllib.request.urlopen(ready["url"], timeout=60) as page:
            assert b"llmctl chat" in page.read()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert rc == 0


def test_local_serve_refuses_a_missing_run_stage_or_step_before_starting_ray(tmp_path, capsys):
    from cli.main import main
    from tests.serve_app import tiny_run

    tiny_run(tmp_path)
    for argv, words in [(["nope"], "run 'nope' not found"), (["tiny", "--step", "99"], "no whole sft checkpoint at "
                                                                                       "step 99"),
                        (["tiny", "--port", "0"], "--port"), (["tiny", "--max-batch", "0"], "--max-batch")]:
        rc = main(["serve", *argv, "--storage", f"file://{tmp_path}", "--local"])
        err = capsys.readouterr().err
        assert rc == 2 and words in err and len(err.strip().splitlines()) == 1, err
