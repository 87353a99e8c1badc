"""trainer/text.py: the one cleaner for text from outside.

Run: .venv/bin/pytest tests/test_text.py
"""

from __future__ import annotations

from tests.hostile import ESC


def test_hostile_clean_drops_sequences_whole():
    from cli.console import clean

    assert clean(f"a{ESC}b\r\n\tc", newlines=True) == "ab\n\tc"
    assert clean("x\n\ty") == "xy"  # one line by default
    assert clean("\u202eevil") == "evil"
    assert clean("a\u200bb\u2028c", newlines=True) == "abc"  # zero-width and line separators: not printable
    assert clean("\x1b]0;title\x07name", limit=3) == "nam"  # the sequence goes whole, then the limit
