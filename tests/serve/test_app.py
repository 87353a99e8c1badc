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


def post(served, path: str, body: bytes, content_type="application/json", **headers) -> tuple[int, dict | str]:
    req = urllib.request.Request(served.url + path, data=body, headers={"Content-Type": content_type, **headers})
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


# ---------------------------------------------------------------------------------------------
# Hostile input: one request must not take the replica down; client errors are 4xx in the API's shape.
# In-process: the Service a replica runs, driven on an asyncio loop as the replica's routes drive it.


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    from tests.serve_app import tiny_run
    from trainer.run_loader import load_run
    from trainer.serve.app import Service

    p = tiny_run(tmp_path_factory.mktemp("service"))
    run = load_run(p.urls["run"], "sft", None, device="cpu")
    svc = Service(run.plan, run.model, run.tokenizer, stage="sft", step=run.step, max_batch=2, max_queue=2,
                  metrics_port=None)
    yield svc
    svc.engine.stop()


def asgi_request(body: bytes = b"", method: str = "POST", path: str = "/v1/chat/completions", **headers):
    from starlette.requests import Request

    headers = {"host": "127.0.0.1:8000", "content-type": "application/json", **headers}
    scope = {"type": "http", "method": method, "path": path, "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    return Request(scope, receive)


def turns(n: int, words: int = 3) -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": f"turn {i} " + "fox dog " * words} for i in range(n)]


def test_hostile_healthz_answers_while_a_large_chat_request_is_tokenised(service, monkeypatch):
    """The ~400 KB request is held inside its tokenising until /healthz has answered: were the tokenising on
    the event loop, /healthz could not run and the request would time out below instead."""
    import asyncio
    import threading

    entered, release = threading.Event(), threading.Event()
    encode = service.tokenizer.encode

    def gated(text, *a, **kw):
        entered.set()
        if not release.wait(60):
            raise TimeoutError("tokenising held the event loop: /healthz never answered")
        return encode(text, *a, **kw)

    monkeypatch.setattr(service.tokenizer, "encode", gated)
    body = json.dumps({"messages": turns(1023, words=48), "max_tokens": 4}).encode()
    assert len(body) > 400_000

    async def main():
        request = asyncio.create_task(service.respond(asgi_request(body), chat=True))
        assert await asyncio.to_thread(entered.wait, 60)  # the request is being tokenised, off the loop
        health = await service.healthz(asgi_request(method="GET", path="/healthz"))
        release.set()
        return health, await request

    health, answer = asyncio.run(main())
    assert health.status_code == 200 and json.loads(health.body)["status"] == "ok"
    assert answer.status_code == 200  # the oldest turns were dropped; the newest fit the context


def test_hostile_each_message_is_tokenised_once(service, monkeypatch):
    from collections import Counter

    from trainer.serve.openai_api import parse_params

    calls: Counter = Counter()
    encode = service.tokenizer.encode

    def counting(text, *a, **kw):
        calls[text] += 1
        return encode(text, *a, **kw)

    monkeypatch.setattr(service.tokenizer, "encode", counting)
    p = parse_params({"messages": turns(1023), "max_tokens": 8}, service.model_id, chat=True)
    ids, max_tokens = service.chat_prompt(p)
    assert len(ids) + max_tokens <= service.context and max_tokens == 8
    assert max(calls.values()) == 1
    assert sum(calls.values()) < 40  # only the newest turns, the ones that can fit a 128-token context


def _old_trim(tok, msgs, want, context):  # the landed algorithm: re-render, drop the oldest exchange, repeat
    while True:
        ids = tok.render_for_completion({"messages": [*msgs, {"role": "assistant", "content": ""}]})
        first = 1 if msgs[0]["role"] == "system" else 0
        if len(ids) + want <= context or len(msgs) - first < 3:
            return ids
        msgs = msgs[:first] + msgs[first + 2:]


@pytest.mark.parametrize("seed", range(8))
def test_trimming_keeps_what_dropping_turns_one_by_one_kept(service, seed):
    import random

    from trainer.serve.openai_api import parse_params

    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog Ray Serve routes requests caf\u00e9 !? 42\n".split(" ")
    msgs = [{"role": ("user", "assistant")[i % 2], "content": " ".join(rng.choices(words, k=rng.randint(0, 30)))}
            for i in range(2 * rng.randint(0, 12) + 1)]
    if seed % 2:
        msgs.insert(0, {"role": "system", "content": "Be " + " ".join(rng.choices(words, k=rng.randint(0, 9)))})
    want = rng.randint(1, 40)
    p = parse_params({"messages": msgs, "max_tokens": want}, service.model_id, chat=True)
    try:
        ids, _ = service.chat_prompt(p)
    except Exception as e:  # noqa: BLE001 - only a prompt that cannot fit even alone
        assert getattr(e, "code", None) == "context_length_exceeded"
        ids = None
    old = _old_trim(service.tokenizer, msgs, want, service.context)
    assert ids == (old if len(old) < service.context else None)


def test_hostile_api_key_guards_the_api_routes(service, monkeypatch):
    import asyncio

    from trainer.serve.access import Access, key_digest

    monkeypatch.setattr(service, "access", Access(allowed_hosts=[], api_key_sha256=key_digest("k-123")))
    body = chat_body(max_tokens=2)

    async def main():
        return [(await service.respond(asgi_request(body, **auth), chat=True)).status_code
                for auth in ({}, {"authorization": "Bearer nope"}, {"authorization": "Bearer k-123"})]

    assert asyncio.run(main()) == [401, 401, 200]
    health = asyncio.run(service.healthz(asgi_request(method="GET", path="/healthz")))
    assert health.status_code == 200


# Over HTTP, on the served app (tests/serve_app.py)


def test_hostile_twenty_thousand_messages_are_a_400_and_the_replica_stays_up(served):
    body = json.dumps({"messages": [{"role": ("user", "assistant")[i % 2], "content": ""} for i in range(20_001)]},
                      separators=(",", ":")).encode()
    assert 300_000 < len(body) < (1 << 20)
    status, answer = post(served, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == "messages" and "1024" in answer["error"]["message"]
    status, answer = post(served, "/v1/chat/completions", json.dumps({"messages": turns(1023, 48), "max_tokens": 4})
                          .encode())
    assert status == 200 and answer["usage"]["prompt_tokens"] + 4 <= 128
    assert served.get("/healthz")["status"] == "ok"


@pytest.mark.parametrize("body, param", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}', "seed"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "seed": 1' + b"0" * 100 + b"}", "seed"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    (b"[" * 100_000 + b"]" * 100_000, None),
])
def test_hostile_client_mistakes_are_400_not_500(served, body, param):
    status, answer = post(served, "/v1/chat/completions", body)
    assert status == 400 and answer["error"]["param"] == param, answer


def test_hostile_completions_on_a_chat_model_name_the_prompt(served):
    status, answer = post(served, "/v1/completions", json.dumps({"prompt": "word " * 400}).encode())
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
    assert answer["error"]["param"] == "prompt"


def test_hostile_stop_sequences_end_the_reply(served):
    c = client(served)
    kw = dict(model=served.model, prompt="The quick brown fox", max_tokens=40, temperature=0.0)
    whole = c.completions.create(**kw).choices[0].text
    assert len(whole) > 12, whole
    stop = whole[6:9]
    cut = whole[:whole.find(stop)]
    r = c.completions.create(stop=[stop, "\x00never"], **kw)
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = list(c.completions.create(stop=stop, stream=True, **kw))
    assert "".join(x.choices[0].text for x in streamed) == cut and streamed[-1].choices[0].finish_reason == "stop"
    chat = c.chat.completions.create(model=served.model, max_tokens=30, temperature=0.0,
                                     messages=[{"role": "user", "content": "Hi"}])
    text = chat.choices[0].message.content
    if len(text) > 6:
        again = c.chat.completions.create(model=served.model, max_tokens=30, temperature=0.0, stop=text[3:6],
                                          messages=[{"role": "user", "content": "Hi"}])
        assert again.choices[0].message.content == text[:text.find(text[3:6])]


@pytest.mark.parametrize("ctype, body", [("text/plain", chat_body()),
                                         ("application/x-www-form-urlencoded", b"messages=hi"),
                                         ("multipart/form-data; boundary=x", b"--x--")])
def test_hostile_bodies_must_be_sent_as_json(served, ctype, body):
    status, answer = post(served, "/v1/chat/completions", body, content_type=ctype)
    assert status == 415 and answer["error"]["code"] == "unsupported_media_type"


def test_hostile_a_rebound_host_name_is_refused(served):
    status, answer = post(served, "/v1/chat/completions", chat_body(max_tokens=2), Host="attacker.example:8000")
    assert status == 400 and answer["error"]["code"] == "invalid_host"
    assert post(served, "/v1/chat/completions", chat_body(max_tokens=2), Host="localhost:8000")[0] == 200


def test_hostile_overload_is_refused_in_the_api_error_shape(served):
    """More requests at once than the replica's batch and queue hold: every refusal is the API's JSON 503, none
    is Ray Serve's plain-text backpressure answer."""
    def one(i):
        req = urllib.request.Request(served.url + "/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": f"{i} the fox", "max_tokens": 100,
                                                      "temperature": 0.0}).encode())
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        answers = list(pool.map(one, range(48)))
    busy = [body for status, body in answers if status == 503]
    assert {status for status, _ in answers} <= {200, 503}
    assert busy, "no request was refused: the burst did not overload the replica"
    for body in busy:
        assert json.loads(body)["error"]["code"] == "server_busy", body[:200]


def test_hostile_serve_leaves_refusing_to_the_replica():
    from trainer.serve.app import build_app

    app = build_app({"run_url": "file:///nowhere", "max_batch": 4, "max_queue": 8})
    config = app._bound_deployment._deployment_config
    assert config.max_queued_requests == -1  # Ray's own refusal is plain text; the replica's is JSON
    assert config.max_ongoing_requests > 4 + 8


def test_hostile_metrics_listen_where_the_api_listens(served):
    health = served.get("/healthz")
    assert health["metrics_host"] == "127.0.0.1"


def test_hostile_sigterm_stops_every_process_serve_local_started(tmp_path):
    """`llmctl serve --local` starts Ray; after SIGTERM, nothing it started may run on (Ray's DashboardAgent and
    RuntimeEnvAgent outlived `ray.shutdown()` by a minute, still listening)."""
    import psutil

    from tests.serve_app import tiny_run

    tiny_run(tmp_path)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS="")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "tiny", "--storage", f"file://{tmp_path}",
                             "--local", "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        for line in proc.stdout:
            if line.startswith("{"):
                break
        started = psutil.Process(proc.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert "raylet" in names and "agent" in names.lower(), names
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        left = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, [" ".join(p.cmdline())[:120] for p in left]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
