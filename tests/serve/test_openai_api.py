"""trainer/serve/openai_api.py without a server: request parsing and its errors, response shapes, and special-token-free text.

The same paths over HTTP, through the openai client, are tests/serve/test_app.py's.
Run: .venv/bin/pytest tests/serve/test_openai_api.py
"""

from __future__ import annotations

import json

import pytest

from trainer.serve.openai_api import MAX_BODY_BYTES, APIError, TextStream, chat_chunk, parse_body, parse_params, sse
from trainer.data.tokenizer import Tokenizer

MODEL = "gpt-d4-run"


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw}


def error_of(fn, *a, **kw) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*a, **kw)
    return e.value


def test_a_full_chat_request_parses():
    p = parse_params(chat(max_tokens=12, temperature=0.5, top_k=40, seed=3, stream=True, top_p=0.9, user="u"),
                     MODEL, chat=True)
    assert (p.max_tokens, p.temperature, p.top_k, p.seed, p.stream) == (12, 0.5, 40, 3, True)
    assert p.messages == [{"role": "user", "content": "hi"}]
    p = parse_params({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                 {"type": "text", "text": "b"}]}],
                      "max_completion_tokens": 5, "model": None}, MODEL, chat=True)
    assert p.messages[0]["content"] == "ab" and p.max_tokens == 5 and p.model == MODEL
    assert parse_params({"prompt": ["once"]}, MODEL, chat=False).prompt == "once"


@pytest.mark.parametrize("body, status, code, param", [
    (chat(model="gpt-4"), 404, "model_not_found", "model"),
    (chat(max_tokens=0), 400, "invalid_value", "max_tokens"),
    (chat(max_tokens=1.5), 400, "invalid_value", "max_tokens"),
    (chat(max_tokens=True), 400, "invalid_value", "max_tokens"),
    (chat(temperature=-0.1), 400, "invalid_value", "temperature"),
    (chat(temperature="hot"), 400, "invalid_value", "temperature"),
    (chat(top_k=0), 400, "invalid_value", "top_k"),
    (chat(seed=-1), 400, "invalid_value", "seed"),
    (chat(n=3), 400, "invalid_value", "n"),
    (chat(stream=1), 400, "invalid_value", "stream"),
    (chat(tools=[{"type": "function"}]), 400, "unsupported_parameter", "tools"),
    ({"model": MODEL, "messages": "hi"}, 400, "invalid_value", "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 3}]}, 400, "invalid_value", "messages[0]"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "invalid_value",
     "messages[0]"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "invalid_value", "messages"),
])
def test_bad_chat_requests_name_the_parameter(body, status, code, param):
    e = error_of(parse_params, body, MODEL, chat=True)
    assert (e.status, e.code, e.param) == (status, code, param)
    assert set(e.body()["error"]) == {"message", "type", "param", "code"} and e.message


def test_bad_bodies():
    assert error_of(parse_body, b"{").code == "invalid_json"
    assert error_of(parse_body, b'"text"').code == "invalid_json"
    assert error_of(parse_body, b"\xff\xfe").code == "invalid_json"
    assert error_of(parse_body, b" " * (MAX_BODY_BYTES + 1)).status == 413
    assert error_of(parse_params, {"prompt": ""}, MODEL, chat=False).param == "prompt"
    assert parse_body(json.dumps(chat()).encode())["model"] == MODEL


def test_events_are_server_sent_json():
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    chunk = json.loads(sse(chat_chunk("id-1", MODEL, {"content": "x"}))[6:])
    assert chunk["object"] == "chat.completion.chunk" and chunk["choices"][0]["delta"] == {"content": "x"}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["hello <|assistant_end|> world <|bos|> caf\u00e9 " * 50], vocab_size=300)


def test_text_stream_never_shows_special_tokens(tok):
    ts = TextStream(tok)
    ids = tok.encode("hi <|assistant_end|> there <|") + [tok.encode_special("<|python_start|>")] + tok.encode("bos|>!")
    out = "".join(ts.push(i) for i in ids) + ts.flush()
    # the special id is dropped; the specials spelled by ordinary tokens (one across the dropped id) removed
    assert out == "hi  there !"
    ts = TextStream(tok)
    assert "".join(ts.push(i) for i in tok.encode("ok <|assistant")) == "ok "  # a special's prefix is held back
    assert ts.flush() == "<|assistant"  # and shown at the end, once it cannot become one
    ts = TextStream(tok)
    assert ts.push(tok.vocab_size + 5) == ""  # an id the tokenizer cannot decode (a padded vocabulary)


def test_text_stream_holds_back_split_characters(tok):
    rank = tok.mergeable_ranks
    ts = TextStream(tok)
    assert ts.push(rank[b"c"]) == "c"
    assert ts.push(rank[b"\xc3"]) == ""  # the first byte of é: held back, not shown as U+FFFD
    assert ts.push(rank[b"\xa9"]) == "\u00e9"


# ---------------------------------------------------------------------------------------------
# Hostile input: client mistakes are 400s, never a 500 or a stuck replica


@pytest.mark.parametrize("seed", [2 ** 64, 10 ** 100])
def test_hostile_seed_past_64_bits_is_a_400(seed):
    e = error_of(parse_params, parse_body(json.dumps(chat(seed=seed)).encode()), MODEL, chat=True)
    assert (e.status, e.code, e.param) == (400, "invalid_value", "seed")
    assert parse_params(chat(seed=2 ** 64 - 1), MODEL, chat=True).seed == 2 ** 64 - 1


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000])
def test_hostile_deeply_nested_json_is_a_400(raw):
    e = error_of(parse_body, raw)
    assert (e.status, e.code) == (400, "invalid_json") and "deep" in e.message


def test_hostile_nested_values_are_not_echoed():
    deep = json.loads("[" * 900 + "]" * 900)
    e = error_of(parse_params, chat(seed=deep), MODEL, chat=True)
    assert e.param == "seed" and len(e.message) < 200


@pytest.mark.parametrize("name, value", [("temperature", float("nan")), ("temperature", float("inf"))])
def test_hostile_non_finite_numbers_are_refused(name, value):
    body = parse_body(json.dumps(chat(**{name: value})).encode())  # Python's json reads NaN and Infinity
    assert error_of(parse_params, body, MODEL, chat=True).param == name


def test_hostile_message_count_is_bounded():
    from trainer.serve.openai_api import MAX_MESSAGES

    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(20_001)]
    e = error_of(parse_params, {"messages": turns}, MODEL, chat=True)
    assert (e.status, e.code, e.param) == (400, "invalid_value", "messages") and str(MAX_MESSAGES) in e.message
    assert len(parse_params({"messages": turns[:MAX_MESSAGES - 1]}, MODEL, chat=True).messages) == MAX_MESSAGES - 1


def test_hostile_turns_must_alternate_before_any_tokenising():
    for msgs in ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                 [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"},
                  {"role": "user", "content": "b"}],
                 [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                  {"role": "user", "content": "b"}]):
        e = error_of(parse_params, {"messages": msgs}, MODEL, chat=True)
        assert (e.status, e.code) == (400, "invalid_value") and e.param.startswith("messages")


@pytest.mark.parametrize("stop, param_ok", [("\n", True), (["a", "bc"], True), (None, True), ([], True),
                                            ("", False), ([1], False), (["a"] * 5, False), ("x" * 1000, False)])
def test_hostile_stop_is_validated(stop, param_ok):
    if param_ok:
        p = parse_params(chat(stop=stop), MODEL, chat=True)
        assert p.stop == ([stop] if isinstance(stop, str) else list(stop or []))
    else:
        assert error_of(parse_params, chat(stop=stop), MODEL, chat=True).param == "stop"


def test_hostile_stop_sequences_cut_the_text_even_across_pieces():
    from trainer.serve.openai_api import StopText

    s = StopText(["END", "\n\n"])
    out = [s.push(x) for x in ("Hello E", "N", "D more")]
    assert "".join(t for t, _ in out) == "Hello " and out[-1][1] is True and out[0] == ("Hello ", False)
    s = StopText(["END"])
    assert s.push("an EN") == ("an ", False)  # "EN" may still become "END": held back
    assert s.push("ding") == ("ENding", False) and s.flush() == ""
    s = StopText(["xyz"])
    assert s.push("abcxy") == ("abc", False) and s.flush() == "xy"  # the held tail is shown at the end
    s = StopText([])
    assert s.push("anything") == ("anything", False)
