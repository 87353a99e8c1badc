"""Text that came from outside (a RayJob, a pod log, an annotation, a stored plan, progress or spend document),
made fit to print: the one cleaner for the trainer's consoles and the CLI.

Anything such text holds was written by someone else (a run's pods, anyone who can write the bucket). Printed
raw, `\\x1b]0;...\\x07` retitles the terminal, `\\x1b[2J` clears it, OSC 52 can write the clipboard, a bidi
override reorders what the reader sees and a lone `\\r` overwrites what was printed before it. `clean` drops
escape sequences whole (CSI, OSC, DCS/SOS/PM/APC, any other ESC form, their C1 forms), then every character
that is not printable (`str.isprintable`: C0/C1 controls, DEL, format characters such as bidi overrides and
zero-width ones, line and paragraph separators), keeping newlines and tabs only where asked. Standard library
only: the trainer's pods and the CLI's start-up import it.
"""

from __future__ import annotations

import re

_ESCAPES = re.compile(r"\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC ... BEL or ST (or cut off)
                      r"|(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"  # CSI (7-bit and the C1 byte)
                      r"|\x9d[^\x07\x1b\x9c]*(?:\x07|\x9c)?"  # C1 OSC
                      r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"  # DCS, SOS, PM, APC
                      r"|\x1b.?", re.S)  # any other ESC + one char


def clean(text, *, newlines: bool = False, limit: int | None = None) -> str:
    """`text` (any object, as `str`) without escape sequences and non-printable characters, at most `limit`
    characters long. `newlines=True` keeps newlines and tabs (a log, a multi-line reply); the default is one
    line (a table cell, an error line, a progress bar's label)."""
    s = _ESCAPES.sub("", str(text))
    if not s.isprintable():
        keep = "\n\t" if newlines else ""
        s = "".join(c for c in s if c.isprintable() or c in keep)
    return s if limit is None else s[:limit]
