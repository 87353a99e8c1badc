"""Who may talk to a served model: JSON bodies only, a Host check, an optional API key.

A web page open in the user's browser can reach a server on 127.0.0.1. Browsers send a cross-site form post or a
`text/plain` fetch without asking the server first (a "simple" request, Fetch standard, CORS), so the page could
drive generations blindly; and with DNS rebinding (its own name re-pointed at 127.0.0.1) it could read the
replies, because the browser then treats the server as the page's own origin. The checks here close both:

- **JSON only.** A body must be sent as `Content-Type: application/json` (415 otherwise). A browser sends that
  type cross-site only after a CORS preflight, which this server never grants.
- **Host.** With a host list (`llmctl serve --local` sets one), the `Host` header must be an IP address,
  `localhost`, or a listed name (this machine's name): a rebound page's requests carry the attacker's name
  (400 `invalid_host`). Without a list (the RayService, reached by the Service's and any ingress's names), no check.
- **API key.** With a key set (`LLMCTL_SERVE_API_KEY` in `llmctl serve --local`'s environment), the `/v1/`
  routes need `Authorization: Bearer <key>`, which the openai client sends as its `api_key` (401
  `invalid_api_key` otherwise). The replica holds the key's SHA-256 only, compared in constant time.
  The chat page, /healthz and /metrics need no key.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

from trainer.serve.openai_api import APIError

API_KEY_ENV = "LLMCTL_SERVE_API_KEY"


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _host_name(host: str) -> str:
    """The name or address in a Host header, without its port, brackets, case or trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):  # [v6]:port
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Access:
    def __init__(self, allowed_hosts: list[str] | None = None, api_key_sha256: str | None = None) -> None:
        self.allowed = None if allowed_hosts is None else {"localhost", *(_host_name(h) for h in allowed_hosts)}
        self.digest = api_key_sha256

    def check(self, headers, *, api: bool, body: bool) -> None:
        """Raise the APIError a request with these headers gets: `api` for the /v1/ routes, `body` for a POST."""
        if self.allowed is not None:
            name = _host_name(headers.get("host") or "")
            if not name or not (_is_address(name) or name in self.allowed):
                raise APIError(400, "the Host header names a host this server does not serve; use its address or "
                               "localhost", code="invalid_host")
        if api and self.digest:
            scheme, _, key = (headers.get("authorization") or "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key_digest(key.strip()), self.digest):
                raise APIError(401, "a valid API key is required: send Authorization: Bearer <key>",
                               code="invalid_api_key")
        if body:
            media = (headers.get("content-type") or "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                raise APIError(415, f"the request body must be sent as Content-Type: application/json, got "
                               f"{media[:60] or 'none'!r}", code="unsupported_media_type")
