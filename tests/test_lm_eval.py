"""`llmctl eval RUN --tasks ...`: lm-eval-harness (its "hf" backend, CPU, float32, remote code) on the finished
run's exported base model, over a local multiple-choice task the test writes (nothing is downloaded:
HF_DATASETS_OFFLINE / HF_HUB_OFFLINE). The same items, written as a CORE bundle, are scored by our CORE scorer
(trainer/evaluate.py): with choices of one token each, lm-eval's `acc` (summed log-likelihood) and CORE's rule
(lowest mean token loss) choose alike item for item, so the accuracies are equal (printed with -s; docs/export.md).
Run: .venv/bin/pytest tests/test_lm_eval.py
"""

from __future__ import annotations

import json
import random

import pytest

TASK = "llmctl_toy_mc"
N_ITEMS, N_CHOICES = 40, 4


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """Nothing reaches the network: the offline switches in the environment, and in the constants of
    huggingface_hub and datasets, which read them when first imported (maybe earlier in the session)."""
    import sys

    cache = tmp_path_factory.mktemp("hf-home")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(cache),
                           "HF_DATASETS_CACHE": str(cache / "datasets")}.items():
            mp.setenv(key, value)
        if "huggingface_hub" in sys.modules:
            mp.setattr(sys.modules["huggingface_hub"].constants, "HF_HUB_OFFLINE", True)
        if "datasets" in sys.modules:
            mp.setattr(sys.modules["datasets"].config, "HF_DATASETS_OFFLINE", True)
            mp.setattr(sys.modules["datasets"].config, "HF_HUB_OFFLINE", True)
        yield


def single_token_words(tok) -> list[str]:
    """Words w for which " w" is one token of our vocabulary (choices of equal token count)."""
    words = []
    for raw, rank in tok.mergeable_ranks.items():
        if len(raw) >= 4 and raw[:1] == b" " and raw[1:].isalpha() and raw[1:].isascii():
            word = raw[1:].decode()
            if tok.encode(" " + word) == [rank]:
                words.append(word)
    return sorted(words)


def toy_items(tok) -> list[dict]:
    """Multiple-choice items in CORE's format whose choices start at a token boundary and are one token each."""
    words = single_token_words(tok)
    assert len(words) >= 2 * N_CHOICES, words
    rng = random.Random(0)
    items = []
    for i in range(N_ITEMS):
        query = f"Item {i}. " + " ".join(rng.sample(words, 6)) + ", then:"
        choices = rng.sample(words, N_CHOICES)
        prefix = tok.encode(query)
        assert all(tok.encode(f"{query} {c}")[:len(prefix)] == prefix for c in choices)
        items.append({"query": query, "choices": choices, "gold": rng.randrange(N_CHOICES)})
    return items


@pytest.fixture(scope="module")
def toy(offline, finished_run, tmp_path_factory, one_torch_thread):
    """The base model exported, the task written for lm-eval and as a CORE bundle, and our model loaded."""
    from trainer import run_loader
    from trainer.hf_export.export import export_run
    from trainer.hf_export.harness import mc_task

    root = tmp_path_factory.mktemp("lm-eval")
    ours = run_loader.load_run(finished_run.urls["run"], "pretrain", device="cpu")
    items = toy_items(ours.tokenizer)
    mc_task(str(root / "tasks"), TASK, items)
    bundle = root / "bundle"
    (bundle / "eval_data").mkdir(parents=True)
    (bundle / "eval_data" / f"{TASK}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    (bundle / "core.yaml").write_text(json.dumps({"icl_tasks": [{
        "label": TASK, "dataset_uri": f"{TASK}.jsonl", "num_fewshot": [0], "icl_task_type": "multiple_choice",
        "continuation_delimiter": " "}]}))
    (bundle / "eval_meta_data.csv").write_text(f"Eval Task,Random baseline\n{TASK},{100 / N_CHOICES}\n")
    export_run(finished_run.urls["run"], str(root / "model"), stage="base")
    return root, ours, items


def core_per_item(ours, bundle_url: str) -> dict[str, bool]:
    """Our CORE scorer's verdict on each item, by query."""
    from trainer.evaluate import load_bundle, score_example

    task = load_bundle(bundle_url).tasks[0]
    return {task.items[i]["query"]: score_example(ours.model, ours.tokenizer, task, i) for i in range(len(task.items))}


def test_lm_eval_acc_equals_core_on_the_same_items(toy):
    from trainer.hf_export.harness import evaluate_dir

    root, ours, items = toy
    core = core_per_item(ours, f"file://{root / 'bundle'}")
    doc = evaluate_dir(str(root / "model"), [TASK], include_path=str(root / "tasks"), log_samples=True)
    lm = {s["doc"]["query"]: s["acc"] == 1.0 for s in doc["samples"][TASK]}
    assert lm.keys() == core.keys() and len(lm) == N_ITEMS
    assert lm == core, {q: (lm[q], core[q]) for q in lm if lm[q] != core[q]}
    acc, core_acc = doc["results"][TASK]["acc"], sum(core.values()) / len(core)
    print(f"\nlm-eval vs CORE on {N_ITEMS} one-token-choice items: lm-eval acc {acc:.4f} "
          f"(acc_norm {doc['results'][TASK]['acc_norm']:.4f}), CORE scorer {core_acc:.4f}; "
          f"{sum(lm[q] == core[q] for q in lm)}/{N_ITEMS} items judged alike")
    assert acc == pytest.approx(core_acc, abs=1e-12)


def test_lm_eval_cli_runs_the_local_task(toy, finished_run, tmp_path, capsys):
    from cli.main import main

    root, ours, items = toy
    out = tmp_path / "lm-eval.json"
    assert main(["eval", finished_run.urls["run"], "--stage", "base", "--tasks", TASK, "--include-path",
                 str(root / "tasks"), "--limit", "8", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["stage"] == "pretrain" and doc["run"] == finished_run.name and f"{TASK}: acc " in printed
    bundle = tmp_path / "bundle8"  # lm-eval's --limit takes the first 8 items in file order
    (bundle / "eval_data").mkdir(parents=True)
    (bundle / "eval_data" / f"{TASK}.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items[:8]))
    (bundle / "core.yaml").write_text((root / "bundle" / "core.yaml").read_text())
    (bundle / "eval_meta_data.csv").write_text((root / "bundle" / "eval_meta_data.csv").read_text())
    core = core_per_item(ours, f"file://{bundle}")
    assert doc["results"][TASK]["acc"] == pytest.approx(sum(core.values()) / 8, abs=1e-12)


def test_lm_eval_bad_input_is_one_line_exit_2(toy, finished_run, tmp_path, capsys):
    """(A task name lm-eval does not know is refused the same way, after lm-eval indexes its own few thousand
    task files: tens of seconds on a loaded CI box, so that case is checked through `task_manager` with the
    include path alone: the name missing there is what triggers the full index.)"""
    from cli.main import main

    root, _, _ = toy
    tasks = str(root / "tasks")
    cases = [
        (["eval", finished_run.urls["run"], "--tasks", TASK, "--include-path", str(tmp_path / "nope")],
         "not a directory"),
        (["eval", "no-such-run", "--storage", f"file://{tmp_path}", "--tasks", TASK, "--include-path", tasks],
         "not found"),
        (["eval", finished_run.urls["run"], "--tasks", " , "], "--tasks"),
        (["eval", finished_run.urls["run"], "--tasks", TASK, "--stage", "rl"], "invalid choice"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_lm_eval_flag_is_checked_stored_and_kept_out_of_the_run_name(capsys):
    from cli.main import main

    def planned(*extra):
        assert main(["plan", "--depth", "12", "--gpus", "8", *extra, "-o", "json"]) == 0
        return json.loads(capsys.readouterr().out)

    plain, asked = planned(), planned("--lm-eval", "hellaswag,arc_easy")
    assert asked["spec"]["lm_eval"] == "hellaswag,arc_easy" and "lm_eval" not in plain["spec"]
    assert asked["name"] == plain["name"], "the lm-eval pass does not change what is trained: same run, resumable"
    for bad, words in ((["--lm-eval", "hellaswag, arc"], "lm_eval"), (["--lm-eval", "a;rm -rf"], "lm_eval"),
                       (["--lm-eval", "hellaswag", "--stages", "pretrain,sft"], "list eval in the stages")):
        assert main(["plan", "--depth", "12", *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


def test_lm_eval_in_the_eval_stage_scores_the_base_model(toy, finished_run):
    """The eval stage's lm-eval pass (trainer/eval_stage.py `lm_eval_results`) on the finished run: the base
    model, the same accuracy as CORE's scorer; a task it cannot run is recorded, not raised."""
    from tests.finished_run import NAME, tiny_plan
    from trainer.eval_stage import lm_eval_results

    root, ours, _ = toy
    p = tiny_plan(finished_run.spec.storage_root, NAME, lm_eval=TASK)
    doc = lm_eval_results(p, {}, "cpu", include_path=str(root / "tasks"))
    core = core_per_item(ours, f"file://{root / 'bundle'}")
    assert doc["stage"] == "pretrain" and doc["results"][TASK]["acc"] == pytest.approx(
        sum(core.values()) / len(core), abs=1e-12)
    said = []
    skipped = lm_eval_results(p, {}, "cpu", say=said.append, include_path=str(root / "no-such-dir"))
    assert "not a directory" in skipped["skipped"] and said and "lm-eval skipped" in said[0]
