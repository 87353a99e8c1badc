"""Evaluation: bits per byte on held-out text, the DCLM CORE score, and the run's `eval` stage.

**bpb** = (nats summed over target tokens) / (ln 2 x bytes of those tokens), counting only targets that are
real text: special tokens (0 bytes) and ignored targets (-1) are left out of both sums. Sums are
all-reduced over ranks before the division, so 2 ranks give the same figure as 1 on the same tokens.
Independent of the tokenizer's vocabulary, unlike loss (nanochat loss_eval.evaluate_bpb). The training loop
calls `evaluate_bpb` for its val passes; the eval stage calls it on the same val tokens.

**CORE** (DCLM, arXiv 2406.11794; nanochat core_eval.py, facts §9) reads an eval bundle in the standard
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

**The eval stage** (`eval_loop`, one Ray Train worker per GPU, after the training stages) loads each trained
stage's newest checkpoint, measures its val bpb on its stage's validation tokens, runs CORE on the base
model, samples a few completions (rank 0), exports the results as metrics and writes
`<run>/eval/results.json` and `<run>/eval/summary.json`.
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

# Greedy 16-token continuations of these prompts show what the base model knows (nanochat base_eval).
BASE_PROMPTS = ("The capital of France is", "The chemical symbol of gold is",
                "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is")
CHAT_PROMPTS = ("Hello! Who are you?", "What does the json module do?", "Write a haiku about the sea.")
BASE_SAMPLE_TOKENS, CHAT_SAMPLE_TOKENS = 16, 64


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
    import fsspec
    import yaml

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")

    def read(rel: str) -> str:
        try:
            return fs.cat_file(f"{root}/{rel}").decode("utf-8")
        except FileNotFoundError:
            raise BundleError(f"eval bundle {url}: {rel} is missing (layout: core.yaml, eval_data/, "
                              "eval_meta_data.csv)") from None

    config = yaml.safe_load(read("core.yaml")) or {}
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
        rel = posixpath.join("eval_data", entry["dataset_uri"])
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
    import fsspec
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
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
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
    import fsspec
    import pyarrow.parquet as pq

    from trainer.shards import list_shards

    shard = list_shards(data_url, storage_options)[-1]
    with fsspec.open(shard, "rb", **(storage_options or {})) as f:
        texts = pq.read_table(f, columns=["text"]).column("text").to_pylist()
    return build_smoke_bundle(bundle_url, texts, per_task=per_task, storage_options=storage_options)


# -------------------------------------------------------------------------------------------- samples


def base_samples(model, tokenizer, prompts=BASE_PROMPTS, max_tokens: int = BASE_SAMPLE_TOKENS) -> list[dict]:
    """Greedy continuations of `prompts` (BOS first), as {prompt, completion}."""
    from trainer.engine import Engine

    engine = Engine(model, stop_tokens=[tokenizer.bos_id])
    out = []
    for p in prompts:
        ids = engine.generate_batch(tokenizer.encode(p, prepend_bos=True), max_tokens=max_tokens, temperature=0.0)[0]
        out.append({"prompt": p, "completion": tokenizer.decode(ids)})
    return out


def chat_samples(model, tokenizer, prompts=CHAT_PROMPTS, max_tokens: int = CHAT_SAMPLE_TOKENS) -> list[dict]:
    """Greedy replies of the chat model to one-turn conversations, rendered as SFT rendered them."""
    from trainer.engine import Engine

    engine = Engine.for_chat(model, tokenizer)
    out = []
    for p in prompts:
        conv = {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": ""}]}
        ids = engine.generate_batch(tokenizer.render_for_completion(conv), max_tokens=max_tokens, temperature=0.0)[0]
        out.append({"prompt": p, "reply": tokenizer.decode(ids).strip()})
    return out


# -------------------------------------------------------------------------------------------- the eval stage

RESULTS_FORMAT = "llmctl.eval/v1"
MODEL_OF_STAGE = {"pretrain": "base", "sft": "chat"}  # which model each training stage leaves behind


def eval_loop(config: dict) -> None:
    """The eval stage on one Ray Train worker. config keys (as trainer/loop.py's `train_loop`): plan (RunPlan
    JSON), stage ("eval"), storage_options, metrics_port_base (None = no HTTP exporter)."""
    import fsspec

    import ray.train

    from trainer import checkpoint
    from trainer.loop import say as say_once
    from trainer.loop import worker_context
    from trainer.metrics import RunMetrics
    from trainer.model import build_model
    from trainer.plan import RunPlan
    from trainer.tokenizer import Tokenizer

    # ---------------------------------------------------------------- context
    t_start = time.perf_counter()
    plan = RunPlan.from_json(config["plan"])
    rank, world, local_rank, device = worker_context()
    opts = config.get("storage_options") or {}
    say = (lambda msg: say_once(0, msg)) if rank == 0 else None
    port_base = config.get("metrics_port_base")
    metrics = RunMetrics(plan, "eval", rank=rank, local_rank=local_rank, world_size=world,
                         device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                         port=None if port_base is None else port_base + local_rank)
    tokenizer = Tokenizer.load(plan.urls["tokenizer"], storage_options=opts)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=device)
    results: dict = {"format": RESULTS_FORMAT, "run": plan.name, "world_size": world, "models": {}}
    B, T = plan.device_batch_size, plan.arch.seq_len

    # ---------------------------------------------------------------- each trained model
    trained = [s for s in plan.stages if s.name in MODEL_OF_STAGE]
    for n, stage in enumerate(trained, start=1):
        url = checkpoint.latest(f"{plan.urls['run']}/{stage.name}", storage_options=opts)
        if url is None:
            raise RuntimeError(f"eval: no whole {stage.name} checkpoint under {plan.urls['run']}/{stage.name}")
        state, meta = checkpoint.load_model_state(url, storage_options=opts, device=device)
        model = build_model(plan.arch, device, compile=False)
        model.load_state_dict(state)
        model.eval()
        name = MODEL_OF_STAGE[stage.name]
        entry: dict = {"stage": stage.name, "checkpoint": url, "step": meta.step}
        if say:
            say(f"[eval] {name} model: {stage.name} step {meta.step} ({url})")

        t0 = time.perf_counter()
        steps = max(1, stage.eval_tokens // (B * T * world))  # the stage's own val pass (trainer/loop.py)
        loader = _val_loader(plan, stage.name, tokenizer, B, T, rank, world, device, opts)
        try:
            entry["val_bpb"] = evaluate_bpb(model, loader, steps, token_bytes)
        finally:
            getattr(loader, "close", lambda: None)()  # stop the pretraining loader's read-ahead
        entry["bpb_tokens"] = steps * B * T * world
        entry["bpb_seconds"] = time.perf_counter() - t0
        if say:
            say(f"[eval] {name} val bpb {entry['val_bpb']:.4f} ({entry['bpb_tokens']:,} tokens)")

        if stage.name == "pretrain":
            t0 = time.perf_counter()
            entry["core"] = _core(model, tokenizer, plan, opts, rank, world, say)
            entry["core"]["seconds"] = time.perf_counter() - t0
        export_metrics(metrics, entry)
        if rank == 0:
            entry["samples"] = base_samples(model, tokenizer) if name == "base" else chat_samples(model, tokenizer)
        results["models"][name] = entry
        ray.train.report({**metrics.snapshot(), "step": n})  # step: models scored so far
        del model, state

    # ---------------------------------------------------------------- results
    results["seconds"] = time.perf_counter() - t_start
    if rank == 0:
        run = plan.urls["run"]
        base = results["models"].get("base", {})
        summary = {"stage": "eval", "status": "completed", "steps": len(trained), "planned_steps": len(trained),
                   "tokens": 0,  # trained tokens: none (the run's token count stays the training count)
                   "tokens_evaluated": sum(m["bpb_tokens"] for m in results["models"].values()),
                   "seconds": results["seconds"],
                   "dollars": results["seconds"] / 3600 * plan.spec.gpus * plan.estimate.price_per_gpu_hour,
                   "val_bpb": base.get("val_bpb", results["models"].get("chat", {}).get("val_bpb")),
                   "core": base.get("core", {}).get("core"), "results": f"{run}/eval/results.json"}
        for fname, doc in (("results.json", results), ("summary.json", summary)):
            with fsspec.open(f"{run}/eval/{fname}", "w", **opts) as f:
                f.write(json.dumps(doc, indent=2))
        say(f"[eval] done in {results['seconds']:.0f} s; results at {run}/eval/results.json")
    metrics.close()


def export_metrics(metrics, entry: dict) -> None:
    """One scored model onto the worker's exporter (trainer/metrics.py RunMetrics): `llmctl_val_bpb`, and for
    the base model `llmctl_core_score` and `llmctl_core_task_centered{task}`. Only tasks of the standard CORE
    set get a series (the label set stays fixed); the score is exported whatever the bundle."""
    from trainer.metrics import CORE_TASKS

    metrics.on_val(entry["val_bpb"])
    core = entry.get("core") or {}
    if "core" in core:
        metrics.on_core(core["core"], {k: v["centered"] for k, v in core["tasks"].items() if k in CORE_TASKS})


def _val_loader(plan, stage: str, tokenizer, B, T, rank, world, device, opts):
    """The validation batches the training loop scores for `stage` (same loader, split="val")."""
    if stage == "pretrain":
        from trainer.data import PretrainLoader

        return PretrainLoader(plan.urls["data"], tokenizer, batch_size=B, seq_len=T, rank=rank, world_size=world,
                              split="val", device=device, state=None, storage_options=opts)
    from trainer.chat import SFTLoader

    return SFTLoader(plan.urls["sft_data"], tokenizer, batch_size=B, seq_len=T, rank=rank, world_size=world,
                     device=device, state=None, split="val", storage_options=opts)


def _core(model, tokenizer, plan, opts, rank, world, say) -> dict:
    """CORE on the plan's bundle; a missing bundle is recorded (the run's training is not lost over it)."""
    url = plan.urls["eval_bundle"]
    try:
        bundle = load_bundle(url, storage_options=opts, max_per_task=plan.spec.core_max_per_task)
    except BundleError as e:
        if say:
            say(f"[eval] CORE skipped: {e}")
        return {"bundle": url, "skipped": str(e)}
    result = evaluate_core(model, tokenizer, bundle, rank=rank, world_size=world, say=say)
    if say:
        say(f"[eval] CORE {result['core']:.4f} over {len(bundle.tasks)} tasks"
            + (" (smoke-test bundle: not a capability score)" if bundle.smoke_test else ""))
    return result
