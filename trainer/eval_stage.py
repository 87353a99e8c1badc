"""The run's eval stage: score every trained model once, after the training stages, on the same workers.

`eval_loop` (one Ray Train worker per GPU, started by trainer/launch.py like a training stage) loads each
trained stage's newest checkpoint, measures its val bpb on its stage's validation tokens (the same tokens as
training's own val pass), runs CORE on the base model, samples a few greedy completions (rank 0), exports the
results as metrics and writes `<run>/eval/results.json` and `<run>/eval/summary.json`. The scoring itself
(bpb, CORE) is trainer/evaluate.py. With `--lm-eval TASKS` (RunSpec.lm_eval), rank 0 then runs lm-eval-harness
on the base model through its Hugging Face export (trainer/hf_export/harness.py), into results.json's `lm_eval`.
"""

from __future__ import annotations

import time

import torch

from trainer.plan.recipe import CORE_TASKS
from trainer.evaluate import BundleError, evaluate_bpb, evaluate_core, load_bundle
from trainer.plan import RunPlan
from trainer.progress import ProgressFile
from trainer.spend import record_world
from trainer.storage import write_json
from trainer.worker import StageConfig, ValPass, stage_summary, start_metrics, worker_context, write_stage_summary
from trainer.worker import say as say_once

# Greedy 16-token continuations of these prompts show what the base model knows (nanochat base_eval).
BASE_PROMPTS = ("The capital of France is", "The chemical symbol of gold is",
                "If yesterday was Friday, then tomorrow will be", "The opposite of hot is",
                "The planets of the solar system are:", "My favorite color is", "If 5*x + 3 = 13, then x is")
# A model trained on the offline sample corpus (Python's own documentation, trainer/data/corpus.py) knows nothing of
# France; prompts in its domain show what it learned instead.
SAMPLE_BASE_PROMPTS = ("Return a new list", "The json module", "Raise ValueError if", "class collections.",
                       "This function returns", "If the file does not exist,", "Module os.path\n\n")
CHAT_PROMPTS = ("Hello! Who are you?", "What does the json module do?", "Write a haiku about the sea.")
SAMPLE_CHAT_PROMPTS = ("What does json.dumps do?", "Explain os.path.join in one sentence.",
                       "A queue holds 12 items. 30 more arrive, then 5 are processed. How many items are left?")
BASE_SAMPLE_TOKENS, CHAT_SAMPLE_TOKENS = 24, 64


def prompts_for(plan: RunPlan) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(base prompts, chat prompts) for the plan's data: in-domain ones for the offline sample corpus."""
    if plan.spec.dataset.startswith("sample"):
        return SAMPLE_BASE_PROMPTS, SAMPLE_CHAT_PROMPTS
    return BASE_PROMPTS, CHAT_PROMPTS


def base_samples(model, tokenizer, prompts=BASE_PROMPTS, max_tokens: int = BASE_SAMPLE_TOKENS) -> list[dict]:
    """Greedy continuations of `prompts` (BOS first), as {prompt, completion}."""
    from trainer.serve.engine import Engine

    engine = Engine(model, stop_tokens=[tokenizer.bos_id])
    out = []
    for p in prompts:
        ids = engine.generate_batch(tokenizer.encode(p, prepend_bos=True), max_tokens=max_tokens, temperature=0.0)[0]
        out.append({"prompt": p, "completion": tokenizer.decode_text(ids)})
    return out


def chat_samples(model, tokenizer, prompts=CHAT_PROMPTS, max_tokens: int = CHAT_SAMPLE_TOKENS) -> list[dict]:
    """Greedy replies of the chat model to one-turn conversations, rendered as SFT rendered them."""
    from trainer.serve.engine import Engine

    engine = Engine.for_chat(model, tokenizer)
    out = []
    for p in prompts:
        conv = {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": ""}]}
        ids = engine.generate_batch(tokenizer.render_for_completion(conv), max_tokens=max_tokens, temperature=0.0)[0]
        out.append({"prompt": p, "reply": tokenizer.decode_text(ids).strip()})
    return out


# -------------------------------------------------------------------------------------------- the eval stage

RESULTS_FORMAT = "llmctl.eval/v1"
MODEL_OF_STAGE = {"pretrain": "base", "sft": "chat"}  # which model each training stage leaves behind


def eval_loop(config: dict) -> None:
    """The eval stage on one Ray Train worker; `config` is a `trainer.worker.StageConfig` as a dict (plan,
    stage "eval", storage_options, metrics_port_base)."""
    import ray.train

    from trainer import checkpoint
    from trainer.run_loader import load_model, load_tokenizer

    # ---------------------------------------------------------------- context
    t_start = time.perf_counter()
    cfg = StageConfig.from_dict(config)
    plan = RunPlan.from_json(cfg.plan)
    w = worker_context()
    rank, world, device = w.rank, w.world, w.device
    opts = cfg.storage_options
    if rank == 0:
        record_world(plan.urls["run"], world, opts)  # the spend ledger prices this size (trainer/spend.py)
    say = (lambda msg: say_once(0, msg)) if rank == 0 else None
    metrics = start_metrics(plan, "eval", w, cfg.metrics_port_base, attempts=cfg.attempts)
    tokenizer = load_tokenizer(plan.urls["tokenizer"], opts)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=device)
    results: dict = {"format": RESULTS_FORMAT, "run": plan.name, "world_size": world, "models": {}}

    # ---------------------------------------------------------------- each trained model
    trained = [s for s in plan.stages if s.name in MODEL_OF_STAGE]
    for n, stage in enumerate(trained, start=1):
        url = checkpoint.latest(f"{plan.urls['run']}/{stage.name}", storage_options=opts)
        if url is None:
            raise RuntimeError(f"eval: no whole {stage.name} checkpoint under {plan.urls['run']}/{stage.name}")
        model, step = load_model(url, plan.arch, device, opts)
        name = MODEL_OF_STAGE[stage.name]
        entry: dict = {"stage": stage.name, "checkpoint": url, "step": step}
        if say:
            say(f"[eval] {name} model: {stage.name} step {step} ({url})")

        t0 = time.perf_counter()
        # the stage's own val pass (trainer/loop.py): the same tokens whatever the world size
        val = ValPass(plan, stage.name, tokenizer, w, storage_options=opts)
        try:
            entry["val_bpb"] = evaluate_bpb(model, val, val.steps, token_bytes)
        finally:
            val.close()  # stop the pretraining loader's read-ahead
        val = ValPass(plan, stage.name, tokenizer, w, storage_options=opts)
        try:  # the same val tokens, scored by their own frequencies: the floor a model without context reaches
            entry["unigram_bpb"] = unigram_bpb(val, val.steps, token_bytes)
        finally:
            val.close()
        entry["bpb_tokens"] = val.tokens
        entry["bpb_seconds"] = time.perf_counter() - t0
        if say:
            say(f"[eval] {name} val bpb {entry['val_bpb']:.4f} (unigram baseline {entry['unigram_bpb']:.4f}; "
                f"{entry['bpb_tokens']:,} tokens)")

        if stage.name == "pretrain":
            t0 = time.perf_counter()
            entry["core"] = _core(model, tokenizer, plan, opts, rank, world, say)
            entry["core"]["seconds"] = time.perf_counter() - t0
        export_metrics(metrics, entry)
        if rank == 0:
            base_p, chat_p = prompts_for(plan)
            entry["samples"] = (base_samples(model, tokenizer, base_p) if name == "base"
                                else chat_samples(model, tokenizer, chat_p))
        results["models"][name] = entry
        if rank == 0:
            ProgressFile(cfg.progress_file).write(stage="eval", step=n, steps=len(trained), val_bpb=entry["val_bpb"])
        ray.train.report({**metrics.snapshot(), "step": n})  # step: models scored so far
        del model

    # ---------------------------------------------------------------- lm-eval-harness (asked for)
    if rank == 0 and plan.spec.lm_eval:
        results["lm_eval"] = lm_eval_results(plan, opts, device, say)

    # ---------------------------------------------------------------- results
    results["seconds"] = time.perf_counter() - t_start
    if rank == 0:
        run = plan.urls["run"]
        base = results["models"].get("base", {})
        summary = stage_summary(plan, "eval", status="completed", steps=len(trained), planned_steps=len(trained),
                                tokens=0,  # trained tokens: none (the run's token count stays the training count)
                                seconds=results["seconds"],
                                tokens_evaluated=sum(m["bpb_tokens"] for m in results["models"].values()),
                                val_bpb=base.get("val_bpb", results["models"].get("chat", {}).get("val_bpb")),
                                core=base.get("core", {}).get("core"), results=f"{run}/eval/results.json")
        write_json(f"{run}/eval/results.json", results, opts)
        write_stage_summary(plan, summary, opts)
        say(f"[eval] done in {results['seconds']:.0f} s; results at {run}/eval/results.json")
    metrics.close()


def unigram_bpb(batches, steps: int, token_bytes: torch.Tensor) -> float:
    """Bits per byte of the best context-free model of these very tokens: each target costs -log2 of its own
    frequency among them. Counted as `evaluate_bpb` counts (targets with bytes, summed over ranks), so the two
    figures are on the same tokens and a model's val bpb below it is what context bought."""
    import torch.distributed as dist

    counts = torch.zeros(token_bytes.numel(), dtype=torch.float64, device=token_bytes.device)
    it = iter(batches)
    for _ in range(steps):
        try:
            _, y = next(it)
        except StopIteration:
            break
        y = y.reshape(-1)
        y = y[y >= 0]
        y = y[token_bytes[y] > 0]
        counts += torch.bincount(y, minlength=counts.numel()).double()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    total, nbytes = counts.sum(), (counts * token_bytes.double()).sum()
    if nbytes.item() == 0:
        return float("nan")
    seen = counts[counts > 0]
    return float(-(seen * torch.log2(seen / total)).sum() / nbytes)


def export_metrics(metrics, entry: dict) -> None:
    """One scored model onto the worker's exporter (trainer/metrics.py RunMetrics): `llmctl_val_bpb`, and for
    the base model `llmctl_core_score` and `llmctl_core_task_centered{task}`. Only tasks of the standard CORE
    set get a series (the label set stays fixed); the score is exported whatever the bundle."""
    metrics.on_val(entry["val_bpb"])
    core = entry.get("core") or {}
    if "core" in core:
        metrics.on_core(core["core"], {k: v["centered"] for k, v in core["tasks"].items() if k in CORE_TASKS})


def lm_eval_results(plan: RunPlan, opts: dict | None, device, say=None, include_path: str | None = None) -> dict:
    """lm-eval-harness on the plan's tasks (RunSpec.lm_eval) for the base model (the chat model where the run did
    not pretrain), exported to Hugging Face format on the way (trainer/hf_export/harness.py `evaluate_run`).
    `include_path`: a directory of local task YAML files. A failure (a task unknown, its data unreachable) is
    recorded, not raised: the run's training and CORE are not lost over it."""
    from trainer.hf_export.harness import evaluate_run

    tasks = plan.spec.lm_eval.split(",")
    stage = "base" if any(s.name == "pretrain" for s in plan.stages) else "sft"
    t0 = time.perf_counter()
    try:
        doc = evaluate_run(plan.urls["run"], tasks, stage=stage, storage_options=opts, include_path=include_path,
                           device=str(device))
    except Exception as e:  # noqa: BLE001 - an optional extra: say why, keep the stage's results
        doc = {"tasks": tasks, "skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        if say:
            say(f"[eval] lm-eval skipped: {doc['skipped']}")
        return doc
    doc["seconds"] = time.perf_counter() - t0
    if say:
        for task, metrics in doc["results"].items():
            say(f"[eval] lm-eval {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))
    return doc


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
