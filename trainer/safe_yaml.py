"""YAML someone else wrote (a `--cluster-config` file, the `llmctl-config` ConfigMap's values, a CORE bundle's
core.yaml), loaded so that a small text cannot become a large object.

PyYAML's `safe_load` runs no code, but it resolves aliases: nine anchors of nine aliases each (~700 bytes,
"billion laughs") load as 9**9 references to one list, and whatever walks, copies, validates or prints the
result (the config's checks, `--dry-run`'s dump) pays for every one: 36 s and 670 MB in `submit --dry-run`,
a MemoryError one level deeper. No file llmctl reads needs an alias, so `load`:

- refuses any alias (and so any `<<` merge key, which takes one) as it composes, before anything is built;
- refuses nesting deeper than `MAX_DEPTH` (a few KB of `[[[[` exhausts the composer's recursion);
- refuses a text over `MAX_CHARS` before parsing it.

Each refusal is a `yaml.YAMLError` whose first line says what and where, so callers' `except yaml.YAMLError`
turn it into their one line. Anchors alone are harmless and allowed.
"""

from __future__ import annotations

import yaml

MAX_CHARS = 1 << 22  # 4 Mi characters: a cluster config is a few KB, core.yaml ~10 KB
MAX_DEPTH = 64  # a Kubernetes affinity nests about 8 deep


class Refused(yaml.YAMLError):
    """A YAML text refused before it was built (an alias, too deep, too large); the message says which."""


class _Loader(yaml.SafeLoader):
    _depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise Refused(f"an alias (*{event.anchor}) at line {event.start_mark.line + 1}: aliases and merge keys "
                          "are not accepted here; write the value out in full")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise Refused(f"nested deeper than {MAX_DEPTH} levels at line {mark.line + 1}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load(text: str | bytes):
    """The one YAML document in `text`, as `yaml.safe_load` would build it, or `Refused` (a `yaml.YAMLError`)."""
    if len(text) > MAX_CHARS:
        raise Refused(f"the text is {len(text):,} characters, over the {MAX_CHARS:,} accepted")
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
