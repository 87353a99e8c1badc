"""Printing text that came from the cluster or from storage: terminal control sequences removed, JSON valid.

Anything a RayJob, a pod log, an annotation, a stored plan or report holds was written by someone else (a run's
pods, anyone who can write the bucket). Printed raw, `\\x1b]0;...\\x07` retitles the terminal, `\\x1b[2J` clears
it, and OSC 52 can write the clipboard. `clean` drops escape sequences whole (CSI, OSC, other ESC forms) and
every other C0/C1 control character and DEL, keeping newlines and tabs unless told not to; `dump_json` writes
strict JSON (no NaN/Infinity: non-finite numbers become null), which `json.dumps` escapes control chars in.
Every print site of such text (status, list, logs, report, chat, error lines in cli/main.py) calls one of them.
"""

from __future__ import annotations

import json
import math
import re

_ESCAPES = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC ... BEL or ST (or cut off)
                      r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"  # CSI (7-bit and the C1 byte)
                      r"|\x9d[^\x07\x1b\x9c]*(?:\x07|\x9c)?"  # C1 OSC
                      r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"  # DCS, SOS, PM, APC
                      r"|\x1b.?", re.S)  # any other ESC + one char
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")  # incl. bidi overrides
_CONTROL_NL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean(text, *, newlines: bool = True) -> str:
    """`text` with escape sequences and control characters removed (`newlines=False`: newlines too, for one
    table cell). Carriage returns go as well: a lone `\\r` can overwrite what was printed before it."""
    s = _ESCAPES.sub("", str(text))
    return (_CONTROL if newlines else _CONTROL_NL).sub("", s)


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dump_json(obj, indent: int | None = 2) -> str:
    """Strict JSON for `-o json`: NaN and infinities (from a stored or reported number) become null."""
    return json.dumps(_finite(obj), indent=indent, allow_nan=False)
