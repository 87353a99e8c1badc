"""Scoring a model: bits per byte on held-out text and the DCLM CORE score.

**bpb** = (nats summed over target tokens) / (ln 2 x bytes of those tokens), counting only targets that are
real text: special tokens (0 bytes) and ignored targets (-1) are left out of both sums. Sums are
all-reduced over ranks before the division, so 2 ranks give the same figure as 1 on the same tokens.
Independent of the tokenizer's vocabulary, unlike loss (nanochat loss_eval.evaluate_bpb). The training loop
calls `evaluate_bpb` for its val passes; the eval stage calls it on the same val tokens.

**CORE** (DCLM, arXiv 2406.11794; nanochat core_eval.py; docs/recipe.md, evaluation) reads an eval bundle in the standard
layout at any fsspec URL: `core.yaml` (the `icl_tasks` list: label, dataset_uri under `eval_data/`,
num_fewshot, icl_task_type, continuation_delimiter), `eval_data/**.jsonl`, and `eval_meta_data.csv`
(`Eval Task`, `Random baseline` in percent). Three task formats:
- multiple_choice `{query, choices, gold}`: one prompt per choice, shared context; the choice whose
  continuation has the lowest mean token loss wins.
- schema `{context_options, continuation, gold}`: one prompt per context, shared continuation; the context
  under which the continuation has the lowest mean loss wins.
- language_modeling `{context, continuation}`: correct iff greedy argmax reproduces every continuation token.
Few-shot examples are drawn per item with `Random(1234 + idx)` from the other items and joined with blank
lines; every prompt starts with BOS; a task's items are shuffled with `Random(1337)` before `max_per_task`
cuts them. Items are strided across ranks and the correct counts summed. Centered accuracy =
(acc - b) / (1 - b) with b the random baseline as a fraction; CORE = mean of the centered values.

The run's eval stage, which calls these on trained checkpoints, is trainer/eval_stage.py.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
import random
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
SHUFFLE_SEED = 1337  # a task's items are shuffled with Random(1337) before the max-per-task cut (base_eval)
FEWSHOT_SEED = 1234  # few-shot examples for item idx: Random(1234 + idx).sample(other items, k) (core_eval)
DEFAULT_DELIMITER = " "  # continuation_delimiter when core.yaml gives none
SMOKE_KEY = "llmctl_smoke_test"  # core.yaml flag of a bundle built from held-out text (build_smoke_bundle)
MAX_BUNDLE_FILE_BYTES = 512 * 1024 * 1024  # one core.yaml, CSV or task JSONL of a CORE bundle, read whole



def _reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


# -------------------------------------------------------------------------------------------- bpb


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """bpb over `steps` batches of (inputs, targets) from `batches` (an iterator); reduced across ranks."""
    device = token_bytes.device
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.int64, device=device)
    it = iter(batches)
    for _ in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            break
        loss = model(x, y, loss_reduction="none").reshape(-1).double()  # nats per target
        y = y.reshape(-1)
        valid = y >= 0
        b = torch.where(valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y))
        counted = b > 0
        nats += loss[counted].sum()
        nbytes += b[counted].sum()
    _reduce_sum(nats)
    _reduce_sum(nbytes)
    total = nbytes.item()
    return float("nan") if total == 0 else nats.item() / (math.log(2) * total)


# -------------------------------------------------------------------------------------------- CORE tasks


@dataclass(frozen=True)
class CoreTask:
    label: str
    kind: str  # one of TASK_TYPES (core.yaml icl_task_type)
    shots: int  # few-shot examples per prompt (num_fewshot[0])
    delimiter: str  # between context and continuation (continuation_delimiter)
    baseline: float  # random-guess accuracy in percent (eval_meta_data.csv "Random baseline")
    items: tuple[dict, ...]  # shuffled with Random(1337), cut to max_per_task

    def __post_init__(self) -> None:
        if self.kind not in TASK_TYPES:
            raise ValueError(f"icl_task_type must be one of {', '.join(TASK_TYPES)}, got {self.kind!r}")
        if self.shots < 0 or (self.shots and self.shots >= len(self.items)):
            raise ValueError(f"num_fewshot {self.shots} needs more than {len(self.items)} items "
                             "(raise max_per_task above the shot count)")
        if not 0 <= self.baseline < 100:
            raise ValueError(f"random baseline must be a percentage in [0, 100), got {self.baseline}")


@dataclass(frozen=True)
class Bundle:
    url: str
    tasks: tuple[CoreTask, ...]
    smoke_test: bool  # built from held-out text by build_smoke_bundle: a pipeline check, not a capability score


class BundleError(ValueError):
    """An eval bundle that is missing or not in the standard layout; the message names the file."""


def load_bundle(url: str, *, storage_options: dict | None = None, max_per_task: int | None = None,
                tasks: tuple[str, ...] | None = None) -> Bundle:
    """The CORE tasks of the bundle at `url` (any fsspec URL), shuffled and optionally cut to `max_per_task`.

    The items of every task are read in full before the shuffle and the cut, so a cut keeps the same items
    the reference keeps. The core.yaml `icl_tasks` are read in file order; `tasks` selects by label.
    """
    from trainer import safe_yaml
    from trainer.storage import filesystem
    import yaml

    fs, root = filesystem(url, storage_options)
    root = root.rstrip("/")

    def read(rel: str) -> str:
        try:  # the bundle is stored and untrusted: each file bounded before it is read (DCLM's are a few MB)
            size = fs.size(f"{root}/{rel}")
            if size is not None and size > MAX_BUNDLE_FILE_BYTES:
                raise BundleError(f"eval bundle {url}: {rel} is {size:,} bytes, over {MAX_BUNDLE_FILE_BYTES:,}")
            return fs.cat_file(f"{root}/{rel}", start=0, end=MAX_BUNDLE_FILE_BYTES).decode("utf-8")
        except FileNotFoundError:
            raise BundleError(f"eval bundle {url}: {rel} is missing (layout: core.yaml, eval_data/, "
                              "eval_meta_data.csv)") from None

    try:  # no aliases (a few hundred bytes of them are a billion nodes), bounded depth: trainer/safe_yaml.py
        config = safe_yaml.load(read("core.yaml")) or {}
    except yaml.YAMLError as e:
        raise BundleError(f"eval bundle {url}: core.yaml is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise BundleError(f"eval bundle {url}: core.yaml is not a mapping with icl_tasks")
    baselines = {row["Eval Task"]: float(row["Random baseline"])
                 for row in csv.DictReader(io.StringIO(read("eval_meta_data.csv")))}
    out = []
    for entry in config.get("icl_tasks") or []:
        label = entry.get("label")
        if not label or "dataset_uri" not in entry:
            raise BundleError(f"eval bundle {url}: core.yaml task entries need a label and a dataset_uri: {entry}")
        if tasks is not None and label not in tasks:
            continue
        if label not in baselines:
            raise BundleError(f"eval bundle {url}: eval_meta_data.csv has no random baseline for {label}")
        uri = entry["dataset_uri"]  # core.yaml is untrusted: a file under eval_data/, nothing else
        if (not isinstance(uri, str) or "://" in uri or uri.startswith("/") or "\\" in uri
                or ".." in posixpath.normpath(uri).split("/")):
            raise BundleError(f"eval bundle {url}: task {label}: dataset_uri {uri!r:.80} must be a relative path "
                              "under eval_data/")
        rel = posixpath.join("eval_data", posixpath.normpath(uri))
        items = [json.loads(line) for line in read(rel).splitlines() if line.strip()]
        random.Random(SHUFFLE_SEED).shuffle(items)
        if max_per_task is not None and max_per_task > 0:
            items = items[:max_per_task]
        shots = entry.get("num_fewshot", [0])
        try:
            out.append(CoreTask(label=label, kind=entry["icl_task_type"],
                                shots=int(shots[0] if isinstance(shots, list) else shots),
                                delimiter=entry.get("continuation_delimiter", DEFAULT_DELIMITER),
                                baseline=baselines[label], items=tuple(items)))
        except (KeyError, ValueError) as e:
            raise BundleError(f"eval bundle {url}: task {label}: {e}") from None
    if not out:
        raise BundleError(f"eval bundle {url}: core.yaml lists no icl_tasks" + (f" named {tasks}" if tasks else ""))
    return Bundle(url=url, tasks=tuple(out), smoke_test=bool(config.get(SMOKE_KEY, False)))


# -------------------------------------------------------------------------------------------- CORE prompts


def fewshot_items(task: CoreTask, idx: int) -> list[dict]:
    """The few-shot examples of item `idx`: a seeded sample of the task's other items."""
    if task.shots == 0:
        return []
    others = [i for i in range(len(task.items)) if i != idx]
    return [task.items[i] for i in random.Random(FEWSHOT_SEED + idx).sample(others, task.shots)]


def render_mc(item: dict, delimiter: str, shots: list[dict]) -> list[str]:
    """One prompt per choice: each shot as `query + delimiter + gold choice`, blank-line separated, then the item."""
    prefix = "".join(f"{s['query']}{delimiter}{s['choices'][s['gold']]}\n\n" for s in shots)
    return [f"{prefix}{item['query']}{delimiter}{choice}" for choice in item["choices"]]


def render_schema(item: dict, delimiter: str, shots: list[dict]) -> list[str]:
    """One prompt per context option, all ending in the item's shared continuation."""
    prefix = "".join(f"{s['context_options'][s['gold']]}{delimiter}{s['continuation']}\n\n" for s in shots)
    return [f"{prefix}{context}{delimiter}{item['continuation']}" for context in item["context_options"]]


def render_lm(item: dict, delimiter: str, shots: list[dict]) -> list[str]:
    """Two prompts: without and with the continuation. Contexts are stripped (some datasets keep trailing
    spaces), and so is the prompt without the continuation, so that it tokenizes as a clean prefix."""
    prefix = "".join(f"{s['context'].strip()}{delimiter}{s['continuation']}\n\n" for s in shots)
    without = f"{prefix}{item['context'].strip()}{delimiter}"
    return [without.strip(), without + item["continuation"]]


RENDER = {"multiple_choice": render_mc, "schema": render_schema, "language_modeling": render_lm}


def render_prompts(task: CoreTask, idx: int) -> list[str]:
    return RENDER[task.kind](task.items[idx], task.delimiter, fewshot_items(task, idx))


def _common_length(seqs: list[list[int]], from_end: bool = False) -> int:
    """Length of the prefix (or suffix) every sequence shares."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        j = -1 - i if from_end else i
        if any(s[j] != seqs[0][j] for s in seqs):
            return i
    return n


def encode_example(task: CoreTask, idx: int, tokenizer) -> tuple[list[list[int]], list[int], list[int]]:
    """Token sequences of item `idx` (BOS first) and, per sequence, the [start, end) span that is scored."""
    prompts = render_prompts(task, idx)
    seqs = [tokenizer.encode(p, prepend_bos=True) for p in prompts]
    if task.kind == "multiple_choice":  # shared context, different continuations: score after the common prefix
        start = _common_length(seqs)
        return seqs, [start] * len(seqs), [len(s) for s in seqs]
    if task.kind == "schema":  # different contexts, shared continuation: score the common suffix
        suffix = _common_length(seqs, from_end=True)
        return seqs, [len(s) - suffix for s in seqs], [len(s) for s in seqs]
    without, with_ = seqs
    # The prompt without the continuation tokenizes as a prefix of the one with it in practice (asserted by the
    # reference); where a merge crosses the boundary, score from the last token the two share.
    start = len(without) if with_[:len(without)] == without else _common_length(seqs)
    return [with_], [start], [len(with_)]


@torch.no_grad()
def score_example(model, tokenizer, task: CoreTask, idx: int) -> bool:
    """Whether the model answers item `idx` correctly (one forward of its 1-4 sequences, BOS right-padded)."""
    seqs, starts, ends = encode_example(task, idx, tokenizer)
    limit = model.cos.size(1)  # positions the rotary table covers: crop from the left beyond it
    for i, s in enumerate(seqs):
        if len(s) > limit:
            cut = len(s) - limit
            seqs[i], starts[i], ends[i] = s[cut:], max(1, starts[i] - cut), ends[i] - cut
    device = model.cos.device
    x = torch.full((len(seqs), max(len(s) for s in seqs)), tokenizer.bos_id, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    logits = model(x)  # (B, T, V) fp32
    if task.kind == "language_modeling":  # position t predicts token t + 1
        s, e = starts[0], ends[0]
        return bool(torch.equal(logits[0, s - 1:e - 1].argmax(-1), x[0, s:e]))
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")  # (B, T - 1)
    means = [losses[i, s - 1:e - 1].mean().item() for i, (s, e) in enumerate(zip(starts, ends))]
    return means.index(min(means)) == task.items[idx]["gold"]


def evaluate_task(model, tokenizer, task: CoreTask, *, rank: int = 0, world_size: int = 1) -> float:
    """Accuracy on the task: this rank scores items rank, rank + W, ...; counts are summed over ranks."""
    device = model.cos.device
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, scored
    for idx in range(rank, len(task.items), world_size):
        counts[0] += int(score_example(model, tokenizer, task, idx))
        counts[1] += 1
    correct, scored = _reduce_sum(counts).tolist()
    return correct / scored if scored else float("nan")


def centered(accuracy: float, baseline_pct: float) -> float:
    """(acc - b) / (1 - b), b = the random baseline as a fraction: 0 at chance, 1 when perfect."""
    b = 0.01 * baseline_pct
    return (accuracy - b) / (1.0 - b)


def core_summary(bundle: Bundle, accuracies: dict[str, float]) -> dict:
    """Per task accuracy, baseline and centered accuracy; CORE = the mean of the centered values."""
    tasks = {}
    for t in bundle.tasks:
        acc = accuracies[t.label]
        tasks[t.label] = {"type": t.kind, "shots": t.shots, "examples": len(t.items), "accuracy": acc,
                          "baseline": t.baseline, "centered": centered(acc, t.baseline)}
    return {"bundle": bundle.url, "smoke_test": bundle.smoke_test, "tasks": tasks,
            "core": sum(v["centered"] for v in tasks.values()) / len(tasks)}


def evaluate_core(model, tokenizer, bundle: Bundle, *, rank: int = 0, world_size: int = 1, say=None) -> dict:
    """CORE of `model` on every task of `bundle`: `core_summary` of the per-task accuracies."""
    was_training = model.training
    model.eval()
    accuracies = {}
    try:
        for t in bundle.tasks:
            t0 = time.perf_counter()
            accuracies[t.label] = evaluate_task(model, tokenizer, t, rank=rank, world_size=world_size)
            if say:
                say(f"[eval] CORE {t.label}: accuracy {accuracies[t.label]:.4f} "
                    f"({len(t.items)} items, {time.perf_counter() - t0:.1f} s)")
    finally:
        model.train(was_training)
    return core_summary(bundle, accuracies)


# -------------------------------------------------------------------------------------------- smoke bundle

SMOKE_TASKS = (  # label, type, shots, baseline %: small stand-ins for each CORE format
    ("smoke_lm", "language_modeling", 2, 0.0),  # last word of a sentence (lambada-like)
    ("smoke_mc", "multiple_choice", 1, 25.0),  # the true second half among 4 (hellaswag-like)
    ("smoke_schema", "schema", 0, 50.0),  # which first half leads to the shared second half (winograd-like)
)


def _sentences(texts, min_words: int = 8, max_words: int = 40) -> list[list[str]]:
    out = []
    for text in texts:
        for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
            words = s.split()
            if min_words <= len(words) <= max_words and s[-1:] in ".!?":
                out.append(words)
    return out


def build_smoke_bundle(url: str, texts, *, per_task: int = 40, seed: int = 0,
                       storage_options: dict | None = None) -> str:
    """Write a small eval bundle in the standard layout, built from held-out `texts`, to `url`; return `url`.

    It runs the same code path as a real bundle (loading, few-shot rendering, scoring, centering), so a
    local run can show a CORE figure end to end. Its core.yaml carries `llmctl_smoke_test: true`, and the
    report says the figure is a smoke test, not a capability score.
    """
    from trainer.storage import filesystem
    import yaml

    rng = random.Random(seed)
    sents = _sentences(texts)
    if len(sents) < per_task + 4:
        raise ValueError(f"texts: {len(sents)} usable sentences (8-40 words), need at least {per_task + 4}")
    rng.shuffle(sents)
    halves = [(" ".join(w[:len(w) // 2]), " ".join(w[len(w) // 2:])) for w in sents]
    lm, mc, schema = [], [], []
    for i in range(per_task):
        words = sents[i]
        lm.append({"context": " ".join(words[:-1]), "continuation": words[-1]})
        first, second = halves[i]
        others = rng.sample([h for j, h in enumerate(halves) if j != i], 3)
        choices = [second] + [o[1] for o in others]
        rng.shuffle(choices)
        mc.append({"query": first, "choices": choices, "gold": choices.index(second)})
        options = [first, others[0][0]]
        rng.shuffle(options)
        schema.append({"context_options": options, "continuation": second, "gold": options.index(first)})
    data = {"smoke_lm": lm, "smoke_mc": mc, "smoke_schema": schema}
    fs, root = filesystem(url, storage_options)
    root = root.rstrip("/")
    fs.makedirs(f"{root}/eval_data/smoke", exist_ok=True)
    tasks, rows = [], []
    for label, kind, shots, baseline in SMOKE_TASKS:
        rel = f"smoke/{label}.jsonl"
        fs.pipe_file(f"{root}/eval_data/{rel}", "".join(json.dumps(x) + "\n" for x in data[label]).encode())
        tasks.append({"label": label, "dataset_uri": rel, "num_fewshot": [shots], "icl_task_type": kind,
                      "continuation_delimiter": " "})
        rows.append({"Eval Task": label, "Task Category": "smoke test", "Task Type": kind, "#shots": shots,
                     "Random baseline": baseline})
    meta = io.StringIO()
    writer = csv.DictWriter(meta, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    fs.pipe_file(f"{root}/eval_meta_data.csv", meta.getvalue().encode())
    fs.pipe_file(f"{root}/core.yaml", yaml.safe_dump({SMOKE_KEY: True, "icl_tasks": tasks}, sort_keys=False).encode())
    return url


def build_smoke_bundle_from_val(data_url: str, bundle_url: str, *, per_task: int = 40,
                                storage_options: dict | None = None) -> str:
    """`build_smoke_bundle` from the corpus's validation shard (the last one: text no training step saw)."""
    from trainer.storage import filesystem
    import pyarrow.parquet as pq

    from trainer.data.shards import list_shards

    shard = list_shards(data_url, storage_options)[-1]
    fs, path = filesystem(shard, storage_options)
    with fs.open(path, "rb") as f:
        texts = pq.read_table(f, columns=["text"]).column("text").to_pylist()
    return build_smoke_bundle(bundle_url, texts, per_task=per_task, storage_options=storage_options)
