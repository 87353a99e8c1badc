"""Credentials recognised by name and by value, so that none reaches a manifest, an annotation or a log.

Secrets reach pods by reference only (a Kubernetes Secret named in the cluster config, `envFrom`/`secretKeyRef`);
a RayJob is readable by everyone who may list RayJobs in the namespace, and its entrypoint is echoed in logs.
So every value llmctl copies into a manifest (`--env`, the cluster config's `env`, `--storage`,
`--core-bundle`, the S3 endpoint) is checked here first:

- by name (`secret_name`): any name containing KEY, TOKEN, SECRET, PASS, PWD, AUTH, CREDENTIAL, PRIVATE,
  CERT, COOKIE or SESSION (WANDB_API_KEY, DB_PASS, HF_AUTH, GITHUB_TOKEN ...): a deny pattern broad on purpose;
- by value (`find_credential`): the published formats of common keys (AWS access key ids `AKIA`/`ASIA` + 16,
  GitHub `ghp_`/`gho_`/`ghu_`/`ghs_`/`ghr_`/`github_pat_`, Hugging Face `hf_`, Slack `xox?-`, OpenAI `sk-`,
  GitLab `glpat-`, Google API keys `AIza`), PEM blocks (`-----BEGIN`), JSON Web Tokens (`eyJ...eyJ...`), and
  URLs whose authority holds a user (`https://user:token@host/...`).

Stdlib only: the CLI and `RunSpec` use it on start-up.
"""

from __future__ import annotations

import re

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASS|PWD|AUTH|CREDENTIAL|PRIVATE|CERT|COOKIE|SESSION", re.I)

# Known key formats (each vendor's documented prefix and length).
_VALUE_PATTERNS = (
    ("an AWS access key id", re.compile(r"\b(AKIA|ASIA|AGPA|AIDA|AROA)[0-9A-Z]{16}\b")),
    ("a GitHub token", re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})")),
    ("a Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30,}")),
    ("a Slack token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}")),
    ("an OpenAI-style API key", re.compile(r"\bsk-[A-Za-z0-9_-]{20,}")),
    ("a GitLab token", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}")),
    ("a Google API key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}")),
    ("a PEM key or certificate", re.compile(r"-----BEGIN [A-Z ]*-----")),
    ("a JSON Web Token", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")),
)
_URL_USER = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]*@")

HOW = "pass credentials by reference: a Kubernetes Secret (s3.credentialsSecret, or env valueFrom.secretKeyRef)"


def url_has_user(value: str) -> bool:
    """True when a URL in `value` carries a user (and maybe a password) in its authority: `https://u:p@host`."""
    return bool(_URL_USER.search(value))


def find_credential(value: str) -> str | None:
    """What credential `value` looks like ("an AWS access key id", ...), or None."""
    if not isinstance(value, str):
        return None
    if url_has_user(value):
        return "a URL with a user:password part"
    for what, pattern in _VALUE_PATTERNS:
        if pattern.search(value):
            return what
    return None


def secret_name(name: str) -> bool:
    """True when an environment variable's name says it holds a credential."""
    return bool(SECRET_NAME.search(name))
