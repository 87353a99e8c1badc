"""The OpenAI-compatible request and response shapes `llmctl serve` speaks, without any web framework.

Parsing checks every field a client may send and turns each mistake into an `APIError` (HTTP status, OpenAI
error type and code, the offending parameter), which the server answers as
`{"error": {"message", "type", "param", "code"}}`: the shape the official `openai` client parses.
Fields we do not act on (top_p, presence_penalty, user, ...) are accepted and ignored, as OpenAI-compatible
servers commonly do; `n` > 1, tools and logprobs are refused plainly.

Replies never contain a raw special token: special ids are never decoded (the engine stops at
`<|assistant_end|>` / `<|bos|>`; any other special id is dropped), and `TextStream` also removes `<|...|>`
strings that ordinary tokens happen to spell, holding back a tail that could still become one.

References: the OpenAI API reference for /v1/chat/completions, /v1/completions and /v1/models
(platform.openai.com/docs/api-reference), and its streaming format (server-sent events, `data: [DONE]`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
import uuid

from trainer.data.tokenizer import SPECIAL_TOKENS

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt that fits a context, small enough to refuse cheaply
DEFAULT_MAX_TOKENS = 256  # `llmctl chat`'s default reply length
MAX_TEMPERATURE = 2.0  # OpenAI's range is 0..2
MAX_SEED = 2 ** 64 - 1  # what torch.Generator.manual_seed takes
MAX_MESSAGES = 1024  # messages per chat request; a longer history is the client's to trim
MAX_STOP, MAX_STOP_CHARS = 4, 256  # `stop`: OpenAI's 4 sequences; each one this long at most
ROLES = ("system", "user", "assistant")
_SPECIAL = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))


class APIError(Exception):
    """A request we refuse: HTTP status, OpenAI error type/code, the parameter at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class Params:
    """One parsed generation request."""

    model: str
    stream: bool
    max_tokens: int | None  # None: as much as the context leaves, capped at DEFAULT_MAX_TOKENS
    temperature: float
    top_k: int | None
    seed: int | None
    messages: list[dict] | None = None  # chat
    prompt: str | None = None  # completions
    stop: list[str] = dataclasses.field(default_factory=list)  # the reply ends before the first of these


def parse_body(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body of {len(raw)} bytes is over the limit of {MAX_BODY_BYTES}",
                       code="request_too_large")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({_short(str(e))})", code="invalid_json") from None
    except RecursionError:  # json's own nesting bound (the interpreter's recursion limit): a 400, not a 500
        raise APIError(400, "the request body is not valid JSON: nested too deep", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _shown(value) -> str:
    """A client's value for an error message: scalars shortened, containers by type (never repr'd: a
    deeply nested list would recurse)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10 ** 30:
        return "an integer of more than 30 digits"
    return _short(repr(value)) if value is None or isinstance(value, (bool, int, float, str)) else type(value).__name__


def _number(body: dict, name: str, default, lo: float, hi: float | None, *, integer: bool):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if (isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value))
            or value < lo or (hi is not None and value > hi)):
        want = "an integer" if integer else "a finite number"
        bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise APIError(400, f"{name} must be {want} {bound}, got {_shown(value)}", param=name, code="invalid_value")
    return value


def parse_params(body: dict, served_model: str, *, chat: bool) -> Params:
    """Validate a /v1/chat/completions (chat=True) or /v1/completions body."""
    model = body.get("model") or served_model  # absent, null or "": the one model served
    if model != served_model:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served_model!r}",
                       param="model", code="model_not_found")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream", code="invalid_value")
    _number(body, "n", 1, 1, 1, integer=True)  # one choice per request
    for unsupported in ("tools", "functions", "logprobs"):
        if body.get(unsupported):
            raise APIError(400, f"{unsupported} is not supported by this server", param=unsupported,
                           code="unsupported_parameter")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", None, 1, None, integer=True)
    top_k = _number(body, "top_k", None, 1, None, integer=True)
    params = Params(model=model, stream=stream, max_tokens=max_tokens,
                    temperature=float(_number(body, "temperature", 1.0, 0, MAX_TEMPERATURE, integer=False)),
                    top_k=top_k, seed=_number(body, "seed", None, 0, MAX_SEED, integer=True),
                    stop=_stop(body.get("stop")))
    if chat:
        params.messages = _messages(body.get("messages"))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "prompt must be a non-empty string", param="prompt", code="invalid_value")
        params.prompt = prompt
    return params


def _stop(stop) -> list[str]:
    """OpenAI's `stop`: null, a string, or a list of up to MAX_STOP strings."""
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise APIError(400, f"stop must be a string or a list of at most {MAX_STOP} non-empty strings of at most "
                       f"{MAX_STOP_CHARS} characters", param="stop", code="invalid_value")
    return list(stops)


def _messages(messages) -> list[dict]:
    """Checked messages: roles as SFT rendered them (an optional system message first, then user and assistant
    turns alternating, user first and last), at most MAX_MESSAGES of them. Checked whole before any tokenising."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", param="messages", code="invalid_value")
    if len(messages) > MAX_MESSAGES:
        raise APIError(400, f"messages: {len(messages)} messages is over this server's limit of {MAX_MESSAGES}; "
                       "drop the oldest turns", param="messages", code="invalid_value")
    out = []
    first = 1 if isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"{where} needs a role among {', '.join(ROLES)}", param=where, code="invalid_value")
        want = "system" if i < first else ("user", "assistant")[(i - first) % 2]
        if m["role"] != want:
            raise APIError(400, f"{where} is from {m['role']!r}, expected {want!r} (an optional system message "
                           "first, then user and assistant turns alternating, user first)", param=where,
                           code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{where}.content: only text parts are supported", param=where,
                               code="invalid_value")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string", param=where, code="invalid_value")
        out.append({"role": m["role"], "content": content})
    if out[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", param="messages", code="invalid_value")
    return out


class StopText:
    """Text pieces in, text out until the first stop sequence (which is not shown): a tail that could still
    become a stop sequence is held back until the next piece says whether it does."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.pending = stops, ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text to show, whether a stop sequence was reached)."""
        if not self.stops:
            return piece, False
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return text[:min(hits)], True
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """Token ids in, printable text out: whole UTF-8 characters only, special ids and `<|...|>` strings removed."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special = frozenset(tokenizer.special_tokens.values())
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token: int) -> str:
        if token in self.special or token >= self.tokenizer.vocab_size:
            return ""
        self.ids.append(token)
        return self._take(final=False)

    def flush(self) -> str:
        return self._take(final=True)

    def _take(self, *, final: bool) -> str:
        text = _SPECIAL.sub("", self.tokenizer.decode(self.ids))
        stable = len(text) if final else len(text.rstrip("\ufffd"))  # U+FFFD: a character still incomplete
        if not final:
            cut = text.rfind("<|", 0, stable)
            if cut >= 0 and any(s.startswith(text[cut:stable]) for s in SPECIAL_TOKENS):
                stable = cut  # hold back a tail that may still spell a special token
        piece = text[self.shown:stable] if stable > self.shown else ""
        self.shown = max(self.shown, stable)
        return piece


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def completion_response(rid: str, model: str, text: str, finish: str | None, use: dict | None = None) -> dict:
    out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
    if use is not None:
        out["usage"] = use
    return out


def models_response(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "llmctl"}]}


def sse(obj) -> bytes:
    """One server-sent event carrying `obj` as JSON (or the literal [DONE])."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
