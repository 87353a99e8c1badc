"""`llmctl serve`: a run's checkpoint behind an OpenAI-compatible HTTP API and a chat page, on Ray Serve.

One Ray Serve application, `llmctl`, of one deployment, `LLMServer`, whose replicas each load the run's model
(the newest whole checkpoint of a stage, or `step`) and serve it with the continuous-batching engine
(trainer/serve/batching.py): concurrent requests share decode steps. Routes (FastAPI, which `ray[serve]` ships):

    POST /v1/chat/completions   messages -> reply; `stream: true` sends SSE chunks ending in `data: [DONE]`
    POST /v1/completions        text -> continuation (the base model's API; works on the chat model too)
    GET  /v1/models             the one model served: the run's name
    GET  /healthz               ready, what is loaded, engine counters (steps, rows per step, queue)
    GET  /metrics               this replica's Prometheus metrics (also on its own port, see below)
    GET  /                      the chat page (trainer/serve/static/chat.html; no external assets)

Bounds: a body over 1 MiB is refused (413); a prompt that cannot fit the context with one generated token is
refused (400, `context_length_exceeded`), after dropping the oldest chat turns as `llmctl chat` does; replies
end at max_tokens, a `stop` string or the context; at most `max_batch` requests decode together and `max_queue`
wait (then 503, which the openai client retries; Serve itself never refuses, its refusal being plain text).
Every refusal is a JSON error body; a failing request never takes the replica down: parsing and tokenising run
on a worker thread, and trimming a conversation tokenises each kept turn once. Who may call: access.py.

Metrics: trainer/serve/metrics.py (requests by status, tokens, time to first token, queue depth), on the
replica's own port `metrics_port` (9500; 0 picks a free one, reported by /healthz) and on GET /metrics.

`build_app(args)` is the Serve application builder named in the RayService (`trainer.serve:build_app`);
`run_local` is `llmctl serve --local`.
"""

import asyncio
import json
import os
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from trainer.serve.access import Access
from trainer.serve.openai_api import (DEFAULT_MAX_TOKENS, MAX_BODY_BYTES, APIError, Params, StopText, TextStream,
                                      chat_chunk, chat_response, completion_response, models_response, new_id,
                                      parse_body, parse_params, sse, usage)
from trainer.serve.metrics import METRICS_PORT, ServeMetrics

APP_NAME = "llmctl"
SERVE_PORT = 8000  # Ray Serve's default HTTP port; the pods' `serve` port
PAGE = Path(__file__).parent / "static" / "chat.html"


class Service:
    """The model, its tokenizer and engine, and the request handling shared by every route."""

    def __init__(self, plan: dict, model, tokenizer, *, stage: str, step: int, max_batch: int, max_queue: int,
                 metrics_port: int | None = METRICS_PORT, metrics_host: str = "0.0.0.0",
                 access: Access | None = None) -> None:
        from trainer.serve.batching import BatchEngine
        from trainer.serve.engine import CHAT_STOP_TOKENS

        self.plan, self.tokenizer, self.stage, self.step = plan, tokenizer, stage, step
        self.model_id = plan["name"]
        self.context = int(plan["arch"]["seq_len"])  # the context the model was trained on
        self.chat = stage == "sft"
        self.created = int(time.time())
        stops = [tokenizer.encode_special(s) for s in CHAT_STOP_TOKENS]
        self.engine = BatchEngine(model, max_len=self.context, stop_tokens=stops, max_batch=max_batch,
                                  max_queue=max_queue, vocab_size=tokenizer.vocab_size).start()
        self.metrics = ServeMetrics(self.model_id, self.engine)
        self.access = access or Access()
        if metrics_port is not None:
            self.metrics.serve_http(metrics_port, host=metrics_host)

    # ---------------------------------------------------------------- prompts
    def prepare(self, raw: bytes, *, chat: bool) -> tuple[Params, list[int], int]:
        """Parse, check and tokenise one request body: CPU work that runs off the event loop (`respond`)."""
        p = parse_params(parse_body(raw), self.model_id, chat=chat)
        ids, max_tokens = self.chat_prompt(p) if chat else self.completion_prompt(p)
        return p, ids, max_tokens

    def chat_prompt(self, p: Params) -> tuple[list[int], int]:
        """(prompt ids, max_tokens): the conversation rendered as SFT rendered it (render_for_completion), the
        oldest exchanges dropped while the prompt and the reply would not fit the context.

        Linear, not quadratic: the newest turns are tokenised one at a time, each once, walking back from the
        last until the context is full; the turns that cannot fit are never tokenised. The first turn kept has
        the system message merged into it, as SFT rendered it, so it is tokenised once more in that form."""
        if not self.chat:
            raise APIError(400, f"{self.model_id} is served from its {self.stage} checkpoint, a base model that "
                           "does not chat; use /v1/completions", code="not_a_chat_model")
        msgs = p.messages  # roles checked by parse_params: [system], user, assistant, ..., user
        system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
        turns = msgs[1:] if system is not None else msgs
        tok, sp = self.tokenizer, self.tokenizer.special_tokens
        budget = self.context - (p.max_tokens or 1) - 2  # <|bos|> ... <|assistant_start|>

        def render(i: int, first: bool) -> list[int]:
            role = "user" if i % 2 == 0 else "assistant"
            text = turns[i]["content"]
            if first and system is not None:
                text = system + "\n\n" + text
            return [sp[f"<|{role}_start|>"], *tok.encode(text), sp[f"<|{role}_end|>"]]

        later: list[list[int]] = []  # rendered turns after the first one kept, newest first
        later_len, start = 0, len(turns) - 1
        head = render(start, True)
        s = start
        while s >= 2:  # try keeping one more exchange: turns s-2 (user, the new first) and s-1 (assistant)
            grown = [render(s, False) if system is not None else head, render(s - 1, False)]
            grown_len = later_len + len(grown[0]) + len(grown[1])
            if grown_len > budget:  # even without their first turn these do not fit: nothing older can
                break
            new_head = render(s - 2, True)
            if len(new_head) + grown_len > budget:
                break
            later, later_len, head, s = [*later, *grown], grown_len, new_head, s - 2
        ids = [tok.bos_id, *head, *(t for part in reversed(later) for t in part), sp["<|assistant_start|>"]]
        return ids, self._max_tokens(ids, p, "messages")

    def completion_prompt(self, p: Params) -> tuple[list[int], int]:
        ids = self.tokenizer.encode(p.prompt, prepend_bos=True)
        return ids, self._max_tokens(ids, p, "prompt")

    def _max_tokens(self, ids: list[int], p: Params, param: str) -> int:
        """`param`: what the route's prompt is called (a chat model's /v1/completions takes `prompt`)."""
        room = self.context - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context is {self.context} tokens "
                           "and a reply needs at least one", param=param, code="context_length_exceeded")
        if p.max_tokens is not None and p.max_tokens > self.context:
            raise APIError(400, f"max_tokens must be at most the context, {self.context}", param="max_tokens",
                           code="invalid_value")
        return min(p.max_tokens or DEFAULT_MAX_TOKENS, room)

    # ---------------------------------------------------------------- generation
    async def pieces(self, ids: list[int], max_tokens: int, p: Params, arrived: float):
        """Yield (text, None) as tokens come, then ("", (finish_reason, completion_tokens))."""
        from trainer.serve.batching import QueueFull

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(token, finish):  # on the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (token, finish))
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(4), "little")
        try:
            req = self.engine.submit(ids, max_tokens=max_tokens, emit=emit, temperature=p.temperature,
                                     top_k=p.top_k, seed=seed)
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}; retry shortly", code="server_busy",
                           kind="server_error") from None
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None
        text, stops, n = TextStream(self.tokenizer), StopText(p.stop), 0
        try:
            while True:
                token, finish = await queue.get()
                if token is not None:
                    if n == 0:
                        self.metrics.ttft.observe(time.perf_counter() - arrived)
                    n += 1
                    self.metrics.tokens.inc()
                    piece, stopped = stops.push(text.push(token))
                    if stopped:  # a stop sequence: the reply ends before it; the row is freed below
                        yield piece, ("stop", n)
                        return
                    if piece:
                        yield piece, None
                if finish is not None:
                    if finish == "error":
                        raise APIError(500, "generation failed on the server; see the replica's log",
                                       code="generation_failed", kind="server_error")
                    piece, stopped = stops.push(text.flush())
                    yield piece + ("" if stopped else stops.flush()), ("stop" if stopped else finish, n)
                    return
        finally:
            req.cancel()  # a client that went away frees its row at the next step; no-op once finished

    async def answer(self, p: Params, ids: list[int], max_tokens: int, *, chat: bool) -> Response:
        arrived = time.perf_counter()
        rid = new_id("chatcmpl" if chat else "cmpl")
        if not p.stream:
            parts, end = [], None
            async for piece, end in self.pieces(ids, max_tokens, p, arrived):
                parts.append(piece)
            finish, n = end
            make = chat_response if chat else completion_response
            return JSONResponse(make(rid, p.model, "".join(parts), finish, usage(len(ids), n)))
        gen = self.pieces(ids, max_tokens, p, arrived)
        first = await gen.__anext__()  # errors before the first token (busy, bad input) are still a 4xx/5xx

        async def events():
            try:
                if chat:
                    yield sse(chat_chunk(rid, p.model, {"role": "assistant", "content": ""}))
                item = first
                while True:
                    piece, end = item
                    if piece:
                        yield sse(chat_chunk(rid, p.model, {"content": piece}) if chat
                                  else completion_response(rid, p.model, piece, None))
                    if end is not None:
                        finish = end[0]
                        yield sse(chat_chunk(rid, p.model, {}, finish) if chat
                                  else completion_response(rid, p.model, "", finish))
                        break
                    item = await gen.__anext__()
            except APIError as e:  # mid-stream: the status is sent already; report it in the stream
                yield sse(e.body())
            finally:
                await gen.aclose()
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---------------------------------------------------------------- routes
    async def respond(self, request: Request, *, chat: bool) -> Response:
        """POST /v1/chat/completions (chat) or /v1/completions: any failure is an answer in the API's error
        shape, and the parsing and tokenising run on a worker thread, so that however large a request is,
        the event loop (other streams, /healthz, Serve's own calls) never waits for it."""
        try:
            self.access.check(request.headers, api=True, body=True)
            raw = await _read_body(request)
            p, ids, max_tokens = await asyncio.to_thread(self.prepare, raw, chat=chat)
            resp = await self.answer(p, ids, max_tokens, chat=chat)
        except APIError as e:
            resp = _error(e)
        except Exception as e:  # noqa: BLE001 - a bug answers 500, the replica stays up
            resp = _error(APIError(500, f"internal error: {type(e).__name__}", kind="server_error"))
            print(f"llmctl serve: request failed: {type(e).__name__}: {e}")
        self.metrics.count(resp.status_code)
        return resp

    async def healthz(self, request: Request) -> Response:
        try:
            self.access.check(request.headers, api=False, body=False)
        except APIError as e:
            return _error(e)
        return JSONResponse(self.health())

    async def models(self, request: Request) -> Response:
        try:
            self.access.check(request.headers, api=True, body=False)
        except APIError as e:
            resp = _error(e)
        else:
            resp = JSONResponse(models_response(self.model_id, self.created))
        self.metrics.count(resp.status_code)
        return resp

    def health(self) -> dict:
        s = self.engine.stats
        return {"status": "ok", "model": self.model_id, "stage": self.stage, "step": self.step,
                "context": self.context, "max_batch": self.engine.max_batch, "max_queue": self.engine.max_queue,
                "queue_depth": self.engine.queue_depth, "active": self.engine.active,
                "metrics_port": self.metrics.port, "metrics_host": self.metrics.host,
                "engine": {"steps": s.steps, "rows": s.rows, "max_rows": s.max_rows, "prefills": s.prefills,
                           "errors": s.errors}}


# -------------------------------------------------------------------------------------------- HTTP

api = FastAPI(title="llmctl serve", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(Exception)
async def _any_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug outside a route's own handling is a 500 in the API's shape too, never a plain-text page."""
    return _error(APIError(500, f"internal error: {type(exc).__name__}", kind="server_error"))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown paths and methods answer in the OpenAI error shape too."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(APIError(exc.status_code, str(exc.detail), code=code).body(), exc.status_code)


async def _read_body(request: Request) -> bytes:
    """The body, refused (413) past MAX_BODY_BYTES without reading the rest into memory."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        _too_large(int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            _too_large(size)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int):
    raise APIError(413, f"request body of {size} bytes or more is over the limit of {MAX_BODY_BYTES}",
                   code="request_too_large")


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@serve.deployment(name="LLMServer", health_check_period_s=10)
@serve.ingress(api)
class LLMServer:
    def __init__(self, run_url: str, stage: str = "sft", step: int | None = None, max_batch: int = 16,
                 max_queue: int = 64, metrics_port: int | None = METRICS_PORT, threads: int | None = None, *,
                 metrics_host: str = "0.0.0.0", allowed_hosts: list[str] | None = None,
                 api_key_sha256: str | None = None) -> None:
        import torch

        from trainer.storage import storage_options_from_env

        if threads:
            torch.set_num_threads(threads)
        from trainer.run_loader import load_run

        opts = storage_options_from_env() if run_url.startswith("s3") else None
        run = load_run(run_url, stage, step, storage_options=opts)
        self.service = Service(run.plan, run.model, run.tokenizer, stage=stage, step=run.step, max_batch=max_batch,
                               max_queue=max_queue, metrics_port=metrics_port, metrics_host=metrics_host,
                               access=Access(allowed_hosts, api_key_sha256))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self.service.respond(request, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self.service.respond(request, chat=False)

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        return await self.service.models(request)

    @api.get("/healthz")
    async def healthz(self, request: Request) -> Response:
        return await self.service.healthz(request)

    @api.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        try:
            self.service.access.check(request.headers, api=False, body=False)
        except APIError as e:
            return _error(e)
        return Response(generate_latest(self.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/")
    async def page(self, request: Request) -> Response:
        try:
            self.service.access.check(request.headers, api=False, body=False)
        except APIError as e:
            return _error(e)
        return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})

    def check_health(self) -> None:  # Serve restarts a replica whose engine thread died
        t = self.service.engine._thread
        if t is None or not t.is_alive():
            raise RuntimeError("the batch engine thread is not running")


# -------------------------------------------------------------------------------------------- building


def build_app(args: dict):
    """The Serve application for `args` (the RayService's serveConfigV2 `args`, or `run_local`'s):
    run_url (required), stage, step, replicas, gpus_per_replica, cpus_per_replica, max_batch, max_queue,
    metrics_port, metrics_host (the metrics server's address, 0.0.0.0 unless set), allowed_hosts (names the
    Host header may carry besides addresses and localhost; absent: no Host check) and api_key_sha256
    (trainer/serve/access.py)."""
    known = {"run_url", "stage", "step", "replicas", "gpus_per_replica", "cpus_per_replica", "max_batch",
             "max_queue", "metrics_port", "metrics_host", "allowed_hosts", "api_key_sha256"}
    unknown = set(args) - known
    if unknown or "run_url" not in args:
        raise ValueError(f"serve args: unknown {sorted(unknown)}" if unknown else "serve args: run_url is required")
    max_batch, max_queue = int(args.get("max_batch", 16)), int(args.get("max_queue", 64))
    cpus = float(args.get("cpus_per_replica", 1))
    deployment = LLMServer.options(
        num_replicas=int(args.get("replicas", 1)),
        ray_actor_options={"num_cpus": cpus, "num_gpus": float(args.get("gpus_per_replica", 0))},
        # The replica refuses what its engine cannot hold, with the API's JSON 503. Serve's own refusal (its
        # queue bound) is a plain-text 503 from the proxy, so Serve queues without a bound and passes the
        # replica twice what its engine holds: those past the engine's bounds are refused within milliseconds.
        max_ongoing_requests=2 * (max_batch + max_queue) + 16, max_queued_requests=-1)
    return deployment.bind(args["run_url"], args.get("stage", "sft"), args.get("step"), max_batch, max_queue,
                           args.get("metrics_port", METRICS_PORT), max(1, int(cpus)),
                           metrics_host=args.get("metrics_host", "0.0.0.0"),
                           allowed_hosts=args.get("allowed_hosts"), api_key_sha256=args.get("api_key_sha256"))


def start_local(args: dict, *, host: str = "127.0.0.1", port: int = SERVE_PORT, num_cpus: int | None = None):
    """Start the app on the local Ray cluster (started here unless one is running); returns once it is ready.
    Locally the metrics server listens where the API does, and the Host header must be an address, localhost
    or this machine's name (trainer/serve/access.py)."""
    import socket

    import ray

    args = {"metrics_host": host, "allowed_hosts": [socket.gethostname()], **args}
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)  # never join another Ray
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)


def run_local(args: dict, *, host: str, port: int, say=print) -> int:
    """`llmctl serve --local`: serve until Ctrl-C or SIGTERM, then shut Serve and Ray down, and stop every
    process Ray started here (its agents outlive `ray.shutdown()` by a minute or more otherwise).
    `LLMCTL_SERVE_API_KEY` in the environment: the /v1/ routes need it (only its SHA-256 reaches Ray)."""
    import signal

    import psutil
    import ray

    from trainer.serve.access import API_KEY_ENV, key_digest

    key = os.environ.get(API_KEY_ENV)
    if key:
        args = {**args, "api_key_sha256": key_digest(key)}
    stop = threading.Event()
    started = not ray.is_initialized()
    try:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        start_local(args, host=host, port=port)
        signal.signal(signal.SIGTERM, lambda *_: stop.set())  # again: ray.init installed its own, which aborts
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        say(json.dumps({"event": "ready", "url": f"http://{shown}:{port}/", "api": f"http://{shown}:{port}/v1"}))
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        ours = psutil.Process().children(recursive=True) if started else []
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            stop_processes(ours)
    return 0


def stop_processes(procs, timeout: float = 10.0) -> None:
    """SIGTERM the processes of `procs` still running, then SIGKILL those still running after `timeout`."""
    import psutil

    alive = [p for p in procs if p.is_running()]
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(alive, timeout=timeout)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=timeout)
