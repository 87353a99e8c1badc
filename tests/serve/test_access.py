"""trainer/serve/access.py: who may talk to a served model.

A web page in the user's browser can send blind cross-site requests to a local API (a form post, text/plain) and,
through DNS rebinding, read its replies; JSON-only bodies, a Host check and an optional API key stop both.
The same checks over HTTP, on the served app, are in tests/serve/test_app.py.
Run: .venv/bin/pytest tests/serve/test_access.py
"""

from __future__ import annotations

import hashlib

import pytest

from trainer.serve.access import Access, key_digest
from trainer.serve.openai_api import APIError

JSON = {"content-type": "application/json", "host": "127.0.0.1:8000"}


def refused(access: Access, headers: dict, **kw) -> APIError:
    with pytest.raises(APIError) as e:
        access.check(headers, **kw)
    return e.value


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; b=x",
                                   None, "application/jsonp", "text/json"])
def test_hostile_bodies_must_be_json(ctype):
    headers = {"host": "127.0.0.1:8000"} | ({"content-type": ctype} if ctype else {})
    e = refused(Access(), headers, api=True, body=True)
    assert (e.status, e.code) == (415, "unsupported_media_type")
    Access().check(JSON | {"content-type": "Application/JSON; charset=utf-8"}, api=True, body=True)
    Access().check({"host": "x"}, api=True, body=False)  # a GET has no body to check


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io",
                                  "", None])
def test_hostile_rebound_host_names_are_refused(host):
    headers = {"content-type": "application/json"} | ({"host": host} if host is not None else {})
    e = refused(Access(allowed_hosts=["mybox"]), headers, api=True, body=True)
    assert (e.status, e.code) == (400, "invalid_host")


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost", "LOCALHOST:8000", "[::1]:8000", "10.1.2.3",
                                  "mybox:8000", "MyBox.", "[fe80::1]"])
def test_addresses_and_named_hosts_pass(host):
    Access(allowed_hosts=["mybox"]).check({"content-type": "application/json", "host": host}, api=True, body=True)


def test_no_host_list_means_no_host_check():  # the cluster: the Service's DNS names, an ingress's
    Access(allowed_hosts=None).check(JSON | {"host": "llm.example.com"}, api=True, body=True)


def test_hostile_api_key_is_required_when_set():
    access = Access(api_key_sha256=key_digest("s3cret-key"))
    for auth in (None, "", "Bearer", "Bearer wrong", "Basic czNjcmV0LWtleQ==", "s3cret-key", "Bearer s3cret-key2"):
        e = refused(access, JSON | ({"authorization": auth} if auth is not None else {}), api=True, body=True)
        assert (e.status, e.code, e.kind) == (401, "invalid_api_key", "invalid_request_error")
        assert "s3cret" not in e.message
    access.check(JSON | {"authorization": "Bearer s3cret-key"}, api=True, body=True)
    access.check(JSON | {"authorization": "bearer  s3cret-key "}, api=True, body=True)
    access.check({"host": "127.0.0.1"}, api=False, body=False)  # the page, /healthz, /metrics stay open
    assert key_digest("s3cret-key") == hashlib.sha256(b"s3cret-key").hexdigest()
