"""A stored run's plan.json, checked before anything is read or allocated because of it.

plan.json sits in shared storage: whoever can write the bucket can write it, so readers (`llmctl chat`,
`llmctl report`, serving) never use its fields as written:

- `architecture(plan)`: the model shape, re-derived by the planner's own formulas from the few numbers that
  define it (layers, head size, vocab, context, windows), each within RunSpec's bounds, and refused unless the
  stored shape equals the derived one: `n_embd=131072` cannot make a reader allocate 64 GiB;
- `stage_names(plan)`: the stages it lists, each one of the known stages (a stage is a directory of the run:
  `../../private/team-b` would read another team's files);
- `tokenizer_url(plan, run_url)`: the tokenizer, re-derived under the storage root the run was opened from;
- `plan_object(doc)`: the document is a JSON object at all (a list or a string is not a plan);
- `run_name(plan)`: the run's name, a DNS-1035 label of at most 47 characters as RunSpec requires (it names
  the RayService, its labels and the served model; printed, it can hold no terminal escapes).

Each refusal is a `StoredPlanError` naming the field (`arch.n_embd`, `stages`, `urls.tokenizer`). Torch-free.
"""

from __future__ import annotations

from trainer.plan.shape import Architecture, architecture as derive
from trainer.plan.recipe import STAGES
from trainer.plan.spec import _DNS1035, MAX_DEPTH, MAX_HEAD_DIM, MAX_SEQ_LEN, MAX_VOCAB_SIZE, PlanError
from trainer.plan.urls import UnsafeURL, rebase, storage_root_of


class StoredPlanError(PlanError):
    """A stored plan.json that this version will not use as it stands (the message names the field)."""


def _field(d, key: str, where: str):
    if not isinstance(d, dict) or key not in d:
        raise StoredPlanError(f"plan.json: {where}.{key} is missing")
    return d[key]


def plan_object(doc) -> dict:
    """`doc` (a parsed plan.json) if it is a JSON object; anything else is refused."""
    if not isinstance(doc, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(doc), "a number")
        raise StoredPlanError(f"plan.json is not a run's plan (a JSON object is expected, it holds {kind})")
    return doc


def run_name(plan: dict) -> str:
    """The stored run name, checked against the rule RunSpec holds names to (DNS-1035, at most 47 chars)."""
    name = _field(plan_object(plan), "name", "plan")
    if not isinstance(name, str) or not _DNS1035.fullmatch(name):
        raise StoredPlanError(f"plan.json: name must be a DNS-1035 label of at most 47 characters (a-z, 0-9, '-'), "
                              f"got {name!r:.60}")
    return name


def architecture(plan: dict) -> Architecture:
    """The model shape of a stored plan, re-derived and compared field by field; refuses anything else."""
    arch = _field(plan, "arch", "plan")
    depth = _field(arch, "n_layer", "arch")
    bounds = {"n_layer": (depth, 1, MAX_DEPTH),
              "head_dim": (_field(arch, "head_dim", "arch"), 8, MAX_HEAD_DIM),
              "vocab_size": (_field(arch, "vocab_size", "arch"), 265, MAX_VOCAB_SIZE),
              "seq_len": (_field(arch, "seq_len", "arch"), 16, MAX_SEQ_LEN)}
    for key, (v, lo, hi) in bounds.items():
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise StoredPlanError(f"plan.json: arch.{key} must be an integer from {lo} to {hi:,}, got {v!r:.40}")
    pattern = _field(arch, "window_pattern", "arch")
    if not isinstance(pattern, str) or not pattern or len(pattern) > 1024 or set(pattern) - {"S", "L"}:
        raise StoredPlanError(f"plan.json: arch.window_pattern must be a string of S and L, got {pattern!r:.40}")
    want = derive(depth, vocab_size=bounds["vocab_size"][0], seq_len=bounds["seq_len"][0],
                  head_dim=bounds["head_dim"][0], window_pattern=pattern)
    for key, value in want.__dict__.items():
        got = arch.get(key)
        if isinstance(value, tuple) and isinstance(got, list):
            got = tuple(got)
        if got != value:
            raise StoredPlanError(f"plan.json: arch.{key} is {got!r:.40}, but a d{depth} model with that vocab "
                                  f"and context has {value!r:.40} (a tampered or foreign plan)")
    return want


def stage_names(plan: dict) -> list[str]:
    """The names of the stored plan's stages, each a known stage, listed once."""
    stages = _field(plan, "stages", "plan")
    names = [s.get("name") if isinstance(s, dict) else s for s in stages] if isinstance(stages, list) else None
    if names is None or any(n not in STAGES for n in names) or len(set(names)) != len(names):
        shown = ", ".join(repr(n)[:60] for n in (names or [stages]))
        raise StoredPlanError(f"plan.json: stages must be among {', '.join(STAGES)}, once each; got {shown}")
    return names


def tokenizer_url(plan: dict, run_url: str) -> str:
    """`<root>/tokenizers/<name>` for the root `run_url` lives under (`<root>/runs/<run>`): the stored URL must
    be `<its storage_root>/tokenizers/<name>`, and only the name is kept."""
    stored = _field(_field(plan, "urls", "plan"), "tokenizer", "urls")
    stored_root = _field(_field(plan, "spec", "plan"), "storage_root", "spec")
    try:
        return rebase(stored, stored_root, storage_root_of(run_url), "tokenizers", "urls.tokenizer")
    except UnsafeURL as e:
        raise StoredPlanError(f"plan.json: {e}") from None
