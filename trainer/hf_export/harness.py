"""lm-eval-harness on an exported model: what `llmctl eval RUN --tasks ...` runs.

The run's stage is exported (trainer/hf_export/export.py) into a local directory and evaluated by lm-eval's
"hf" backend: transformers' AutoModelForCausalLM with `trust_remote_code=True`, float32, BOS first on every
context (`add_bos_token`), as our CORE scorer and pretraining feed the model. Tasks are lm-eval task names,
found among lm-eval's own or in `include_path` (a directory of task YAML files, e.g. one `mc_task` wrote).

How lm-eval's multiple-choice accuracy relates to our CORE scorer (trainer/evaluate.py), on the same items
(`query`, `choices`, `gold`; prompt = query + delimiter + choice, no few-shot):
- CORE picks the choice whose tokens after the choices' common prefix have the lowest *mean* token loss;
- lm-eval's `acc` picks the choice with the highest *summed* log-likelihood of its continuation, `acc_norm`
  the highest summed log-likelihood per character of the choice.
Tokens the choices share add the same log-likelihood to every choice, so where the choices have the same
number of tokens, `acc` and CORE choose alike, item for item (tests/test_lm_eval.py shows it on the
finished run). With choices of different token counts neither metric is CORE's rule (mean per token).
"""

from __future__ import annotations

import json
import os
import tempfile

METRICS = ("acc", "acc_norm")


def mc_task(directory: str, name: str, items: list[dict], *, delimiter: str = " ") -> str:
    """Write a local lm-eval multiple-choice task over CORE-format items ({query, choices, gold}) into
    `directory`: `<name>.jsonl` and `<name>.yaml` (load with include_path=directory); returns the YAML path.
    Zero-shot, target delimiter = CORE's continuation delimiter, metrics acc and acc_norm."""
    os.makedirs(directory, exist_ok=True)
    data = os.path.abspath(os.path.join(directory, f"{name}.jsonl"))
    with open(data, "w") as f:
        for item in items:
            f.write(json.dumps({"query": item["query"], "choices": list(item["choices"]), "gold": int(item["gold"])})
                    + "\n")
    spec = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
        "test_split": "test", "output_type": "multiple_choice", "num_fewshot": 0,
        "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
        "target_delimiter": delimiter,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in METRICS],
    }
    path = os.path.join(directory, f"{name}.yaml")
    with open(path, "w") as f:
        json.dump(spec, f, indent=1)  # JSON is YAML: no YAML writer needed
    return path


class TaskError(ValueError):
    """Tasks lm-eval does not know, or an include path that is not a directory; nothing was run."""


def task_manager(tasks: list[str], include_path: str | None = None):
    """lm-eval's TaskManager that knows every one of `tasks`; TaskError naming those it does not know."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise TaskError("no tasks given")
    if include_path is not None and not os.path.isdir(include_path):
        raise TaskError(f"include path {include_path} is not a directory of task YAML files")
    if include_path:  # lm-eval's own thousands of task files take seconds to index: only when a task is not here
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(manager.all_tasks):
            return manager
    manager = TaskManager(include_path=include_path)
    unknown = sorted(set(tasks) - set(manager.all_tasks))
    if unknown:
        raise TaskError(f"lm-eval knows no task {', '.join(unknown)}"
                        + ("" if include_path else " (a local task needs --include-path DIR)"))
    return manager


def evaluate_dir(model_dir: str, tasks: list[str], *, include_path: str | None = None, limit: int | None = None,
                 batch_size: int = 8, device: str = "cpu", log_samples: bool = False, manager=None) -> dict:
    """lm-eval's results for `tasks` on the exported model at local `model_dir`:
    {"results": {task: {metric: value}}, "samples": {task: [...]} when log_samples}."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(
        model="hf", model_args={"pretrained": model_dir, "trust_remote_code": True, "dtype": "float32",
                                "add_bos_token": True},
        tasks=list(tasks), task_manager=manager or task_manager(tasks, include_path), batch_size=batch_size,
        device=device, limit=limit, log_samples=log_samples, bootstrap_iters=0)
    if out is None:  # lm-eval returns None on ranks other than 0
        return {}
    results = {task: {k.split(",")[0]: v for k, v in res.items() if isinstance(v, (int, float)) and "," in k}
               for task, res in out["results"].items()}
    doc = {"results": results}
    if log_samples:
        doc["samples"] = out.get("samples", {})
    return doc


def evaluate_run(run_url: str, tasks: list[str], *, stage: str = "sft", step: int | None = None,
                 storage_options: dict | None = None, include_path: str | None = None, limit: int | None = None,
                 batch_size: int = 8, device: str = "cpu") -> dict:
    """Export the run's stage into a temporary directory and evaluate it there (`evaluate_dir`); the results
    with the run, stage and step evaluated. Unknown tasks (TaskError) and runs (RunLoadError) fail first."""
    from trainer.hf_export.export import export_run

    manager = task_manager(tasks, include_path)
    with tempfile.TemporaryDirectory(prefix="llmctl-lm-eval-") as tmp:
        done = export_run(run_url, os.path.join(tmp, "model"), stage=stage, step=step,
                          storage_options=storage_options)
        doc = evaluate_dir(os.path.join(tmp, "model"), tasks, limit=limit, batch_size=batch_size, device=device,
                           manager=manager)
    return {"run": done.run, "stage": done.stage, "step": done.step, "tasks": list(tasks), **doc}
