"""trainer/evaluate.py: bpb by hand, CORE prompts against hand-written strings, scoring on models whose answers
are known, centered accuracy and CORE arithmetic, 2 ranks == 1 rank, bundles on S3, and the eval stage in the
plan and on a real local Ray cluster.

Run: .venv/bin/pytest tests/test_evaluate.py
"""

import json
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from trainer import eval_stage
from trainer import evaluate as ev
from trainer.evaluate import Bundle, CoreTask
from trainer.plan import RunSpec, plan

WORDS = ("apple river stone green quick house light dark music table paper cloud north south water fire bread "
         "horse glass silver winter summer garden window letter mountain forest ocean candle mirror").split()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tok():
    from trainer.data.tokenizer import Tokenizer

    rng = random.Random(0)
    return Tokenizer.train([sentence(rng, 12) + "." for _ in range(2000)], 400)


def tiny_model(tok, seed=0):
    from trainer.model import build_model
    from trainer.plan.shape import architecture

    torch.manual_seed(seed)
    return build_model(architecture(2, vocab_size=tok.vocab_size, seq_len=128, head_dim=64), "cpu").eval()


# -------------------------------------------------------------------------------------------- bpb


class UniformLM(torch.nn.Module):
    """A language model with equal logits over its V tokens: every counted target costs exactly ln V nats."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, x, y, loss_reduction="mean"):
        logits = torch.zeros(*y.shape, self.vocab)
        return F.cross_entropy(logits.view(-1, self.vocab), y.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction).view(y.shape)


def test_bpb_against_a_hand_computed_value():
    token_bytes = torch.tensor([0, 1, 2, 3, 1, 1, 2, 4])  # id 0 is a special token: no bytes
    b1 = (torch.zeros(1, 4, dtype=torch.long), torch.tensor([[1, 2, 0, -1]]))  # counts ids 1, 2: 2 tokens, 3 bytes
    b2 = (torch.zeros(1, 4, dtype=torch.long), torch.tensor([[7, 3, 3, 5]]))  # 4 tokens, 4+3+3+1 = 11 bytes
    model = UniformLM(8)  # ln 8 nats = 3 bits per token
    assert ev.evaluate_bpb(model, [b1], 1, token_bytes) == pytest.approx(2 * 3 / 3)
    assert ev.evaluate_bpb(model, [b1, b2], 2, token_bytes) == pytest.approx(6 * 3 / 14)
    assert ev.evaluate_bpb(model, [b1, b2], 1, token_bytes) == pytest.approx(2.0)  # `steps` caps the batches
    assert ev.evaluate_bpb(model, [b1], 5, token_bytes) == pytest.approx(2.0)  # a short iterator just ends
    assert math.isnan(ev.evaluate_bpb(model, [(b1[0], torch.tensor([[0, -1, 0, 0]]))], 1, token_bytes))


# -------------------------------------------------------------------------------------------- prompts

MC_ITEMS = (
    {"query": "The sky is", "choices": ["blue", "green", "loud"], "gold": 0},
    {"query": "Fire is", "choices": ["cold", "hot"], "gold": 1},
    {"query": "Snow is", "choices": ["white", "black"], "gold": 0},
)
SCHEMA_ITEMS = (
    {"context_options": ["The cat sat because it", "The mat sat because it"], "continuation": "was tired.", "gold": 0},
    {"context_options": ["Bob thanked Al since he", "Al thanked Bob since he"], "continuation": "got help.", "gold": 0},
    {"context_options": ["The cup broke as it", "The floor broke as it"], "continuation": "fell.", "gold": 0},
)
LM_ITEMS = (
    {"context": "Two plus two is ", "continuation": "four"},
    {"context": "The capital of France is", "continuation": "Paris"},
    {"context": "  Water boils at 100 ", "continuation": "degrees"},
)


def test_fewshot_choice_is_seeded_per_item():
    t = CoreTask("t", "multiple_choice", 1, " ", 25.0, MC_ITEMS)
    # Random(1234 + idx).sample(other indices, 1): item 0 -> 2, item 1 -> 2, item 2 -> 1 (pinned)
    assert [ev.fewshot_items(t, i) for i in range(3)] == [[MC_ITEMS[2]], [MC_ITEMS[2]], [MC_ITEMS[1]]]
    assert ev.fewshot_items(CoreTask("t", "multiple_choice", 0, " ", 25.0, MC_ITEMS), 0) == []


def test_multiple_choice_prompts():
    t = CoreTask("t", "multiple_choice", 1, " ", 25.0, MC_ITEMS)
    assert ev.render_prompts(t, 0) == ["Snow is white\n\nThe sky is blue",
                                       "Snow is white\n\nThe sky is green",
                                       "Snow is white\n\nThe sky is loud"]
    t0 = CoreTask("t", "multiple_choice", 0, "\nAnswer: ", 25.0, MC_ITEMS)
    assert ev.render_prompts(t0, 1) == ["Fire is\nAnswer: cold", "Fire is\nAnswer: hot"]


def test_schema_prompts():
    t = CoreTask("t", "schema", 1, " ", 50.0, SCHEMA_ITEMS)
    assert ev.render_prompts(t, 2) == ["Bob thanked Al since he got help.\n\nThe cup broke as it fell.",
                                       "Bob thanked Al since he got help.\n\nThe floor broke as it fell."]


def test_language_modeling_prompts():
    t = CoreTask("t", "language_modeling", 1, " ", 0.0, LM_ITEMS)
    # Contexts are stripped; the prompt without the continuation is stripped too (no trailing delimiter).
    assert ev.render_prompts(t, 0) == ["Water boils at 100 degrees\n\nTwo plus two is",
                                       "Water boils at 100 degrees\n\nTwo plus two is four"]
    t2 = CoreTask("t", "language_modeling", 2, "\nA: ", 0.0, LM_ITEMS)
    assert ev.render_prompts(t2, 1) == [
        "Water boils at 100\nA: degrees\n\nTwo plus two is\nA: four\n\nThe capital of France is\nA:",
        "Water boils at 100\nA: degrees\n\nTwo plus two is\nA: four\n\nThe capital of France is\nA: Paris"]


def test_scored_spans_are_the_continuations(tok):
    mc = CoreTask("t", "multiple_choice", 0, " ", 25.0, tuple(
        {"query": "apple river stone", "choices": ["green quick", "house", "light dark music"], "gold": 0}
        for _ in range(2)))
    seqs, starts, ends = ev.encode_example(mc, 0, tok)
    assert all(s[0] == tok.bos_id for s in seqs)
    assert [tok.decode(s[a:b]) for s, a, b in zip(seqs, starts, ends)] == [" green quick", " house",
                                                                            " light dark music"]
    sc = CoreTask("t", "schema", 0, " ", 50.0, tuple(
        {"context_options": ["apple river", "stone green quick"], "continuation": "house light", "gold": 1}
        for _ in range(2)))
    seqs, starts, ends = ev.encode_example(sc, 0, tok)
    assert [tok.decode(s[a:b]) for s, a, b in zip(seqs, starts, ends)] == [" house light"] * 2
    lm = CoreTask("t", "language_modeling", 0, " ", 0.0, tuple(
        {"context": "apple river stone ", "continuation": "green quick"} for _ in range(2)))
    seqs, starts, ends = ev.encode_example(lm, 0, tok)
    assert len(seqs) == 1 and tok.decode(seqs[0][starts[0]:ends[0]]) == " green quick"


# -------------------------------------------------------------------------------------------- arithmetic


def test_centered_accuracy_and_core_by_hand():
    assert ev.centered(0.25, 25.0) == pytest.approx(0.0)
    assert ev.centered(1.0, 25.0) == pytest.approx(1.0)
    assert ev.centered(0.5, 25.0) == pytest.approx(1 / 3)  # (0.5 - 0.25) / 0.75
    assert ev.centered(0.4, 50.0) == pytest.approx(-0.2)  # below chance is negative
    tasks = (CoreTask("a", "multiple_choice", 0, " ", 25.0, MC_ITEMS),
             CoreTask("b", "schema", 0, " ", 50.0, SCHEMA_ITEMS),
             CoreTask("c", "language_modeling", 0, " ", 0.0, LM_ITEMS))
    s = ev.core_summary(Bundle("x", tasks, False), {"a": 0.5, "b": 0.8, "c": 0.3})
    assert s["tasks"]["a"]["centered"] == pytest.approx(1 / 3)
    assert s["tasks"]["b"]["centered"] == pytest.approx(0.6)  # (0.8 - 0.5) / 0.5
    assert s["tasks"]["c"]["centered"] == pytest.approx(0.3)
    assert s["core"] == pytest.approx((1 / 3 + 0.6 + 0.3) / 3)  # 0.41111


# -------------------------------------------------------------------------------------------- scoring


def known_bundle(tok, n=6, seed=1):
    rng = random.Random(seed)
    mc = CoreTask("mc", "multiple_choice", 1, " ", 25.0, tuple(
        {"query": sentence(rng, 6), "choices": [sentence(rng, 3) for _ in range(4)], "gold": rng.randrange(4)}
        for _ in range(n)))
    sc = CoreTask("sc", "schema", 0, " ", 50.0, tuple(
        {"context_options": [sentence(rng, 5), sentence(rng, 5)], "continuation": sentence(rng, 4),
         "gold": rng.randrange(2)} for _ in range(n)))
    lm = CoreTask("lm", "language_modeling", 1, " ", 0.0, tuple(
        {"context": sentence(rng, 6), "continuation": sentence(rng, 2)} for _ in range(n)))
    return Bundle("test", (mc, sc, lm), False)


def test_a_model_overfit_on_the_answers_scores_one(tok):
    """Train a tiny GPT on exactly the gold sequences the evaluator renders; it must then get every item right."""
    bundle = known_bundle(tok)
    gold = []
    for t in bundle.tasks:
        for i, item in enumerate(t.items):
            seqs, _, _ = ev.encode_example(t, i, tok)
            gold.append(seqs[0] if t.kind == "language_modeling" else seqs[item["gold"]])
    T = max(len(s) for s in gold)
    x = torch.full((len(gold), T), tok.bos_id)
    y = torch.full((len(gold), T), -1)
    for i, s in enumerate(gold):
        x[i, :len(s)] = torch.tensor(s)
        y[i, :len(s) - 1] = torch.tensor(s[1:])
    model = tiny_model(tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(80):
        model(x, y).backward()
        opt.step()
        opt.zero_grad()
    result = ev.evaluate_core(model, tok, bundle)
    assert {k: v["accuracy"] for k, v in result["tasks"].items()} == {"mc": 1.0, "sc": 1.0, "lm": 1.0}
    assert result["core"] == 1.0
    assert model.training, "evaluate_core restores the model's mode"


def test_a_random_model_scores_near_the_baseline(tok):
    rng = random.Random(5)
    n = 240
    mc = CoreTask("mc", "multiple_choice", 0, " ", 25.0, tuple(
        {"query": sentence(rng, 5), "choices": [sentence(rng, 2) for _ in range(4)], "gold": rng.randrange(4)}
        for _ in range(n)))
    sc = CoreTask("sc", "schema", 0, " ", 50.0, tuple(
        {"context_options": [sentence(rng, 4), sentence(rng, 4)], "continuation": sentence(rng, 2),
         "gold": rng.randrange(2)} for _ in range(n)))
    result = ev.evaluate_core(tiny_model(tok, seed=3), tok, Bundle("test", (mc, sc), False))
    # 240 items: one standard error is 0.028 (MC) and 0.032 (schema); allow ~3.
    assert abs(result["tasks"]["mc"]["accuracy"] - 0.25) < 0.09
    assert abs(result["tasks"]["sc"]["accuracy"] - 0.50) < 0.10
    assert abs(result["core"]) < 0.2


# -------------------------------------------------------------------------------------------- bundles


def write_texts(rng, n=200):
    return [". ".join(sentence(rng, rng.randint(9, 16)).capitalize() for _ in range(5)) + "." for _ in range(n)]


def test_smoke_bundle_round_trips_in_the_standard_layout(tmp_path):
    url = ev.build_smoke_bundle(f"file://{tmp_path}/bundle", write_texts(random.Random(2)), per_task=20)
    names = sorted(os.path.relpath(os.path.join(d, f), tmp_path / "bundle")
                   for d, _, fs in os.walk(tmp_path / "bundle") for f in fs)
    assert names == ["core.yaml", "eval_data/smoke/smoke_lm.jsonl", "eval_data/smoke/smoke_mc.jsonl",
                     "eval_data/smoke/smoke_schema.jsonl", "eval_meta_data.csv"]
    b = ev.load_bundle(url)
    assert b.smoke_test and [(t.label, t.kind, t.shots, t.baseline, len(t.items)) for t in b.tasks] == [
        ("smoke_lm", "language_modeling", 2, 0.0, 20), ("smoke_mc", "multiple_choice", 1, 25.0, 20),
        ("smoke_schema", "schema", 0, 50.0, 20)]
    raw = [json.loads(line) for line in open(tmp_path / "bundle/eval_data/smoke/smoke_mc.jsonl")]
    assert sorted(map(json.dumps, raw)) == sorted(map(json.dumps, b.tasks[1].items))  # shuffled, nothing lost
    random.Random(1337).shuffle(raw)
    assert list(b.tasks[1].items) == raw  # the reference's seeded shuffle
    capped = ev.load_bundle(url, max_per_task=5, tasks=("smoke_mc",))
    assert [len(t.items) for t in capped.tasks] == [5] and capped.tasks[0].items == b.tasks[1].items[:5]


def test_bundle_errors_name_the_file(tmp_path):
    url = ev.build_smoke_bundle(f"file://{tmp_path}/b", write_texts(random.Random(2)), per_task=8)
    os.remove(tmp_path / "b/eval_data/smoke/smoke_lm.jsonl")
    with pytest.raises(ev.BundleError, match="smoke_lm.jsonl is missing"):
        ev.load_bundle(url)
    with pytest.raises(ev.BundleError, match="core.yaml is missing"):
        ev.load_bundle(f"file://{tmp_path}/nowhere")
    with pytest.raises(ev.BundleError, match="num_fewshot 1 needs more than 1 items"):
        ev.load_bundle(url, tasks=("smoke_mc",), max_per_task=1)


def test_bundle_on_s3(s3_server, tmp_path):
    texts = write_texts(random.Random(4))
    bucket = s3_server.bucket("bundle")
    ev.build_smoke_bundle(f"{bucket}/eval_bundle", texts, per_task=10, storage_options=s3_server.storage_options)
    ev.build_smoke_bundle(f"file://{tmp_path}/eval_bundle", texts, per_task=10)
    remote = ev.load_bundle(f"{bucket}/eval_bundle", storage_options=s3_server.storage_options)
    local = ev.load_bundle(f"file://{tmp_path}/eval_bundle")
    assert remote.tasks == local.tasks and remote.smoke_test


# -------------------------------------------------------------------------------------------- 2 ranks == 1 rank


def _rank_worker(rank, world, tmp, bundle_url):
    """One of two gloo processes: CORE and bpb on this rank's share, reduced; rank 0 writes the result."""
    import torch.distributed as dist

    from trainer.data.tokenizer import Tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    tok = Tokenizer.load(f"file://{tmp}/tok")
    model = tiny_model(tok)
    model.load_state_dict(torch.load(f"{tmp}/model.pt", weights_only=True))
    core = ev.evaluate_core(model, tok, ev.load_bundle(bundle_url), rank=rank, world_size=world)
    x, y = torch.load(f"{tmp}/batches.pt", weights_only=True)
    token_bytes = torch.tensor(tok.token_bytes())
    bpb = ev.evaluate_bpb(model, [(x[i:i + 1], y[i:i + 1]) for i in range(rank, len(x), world)], 4, token_bytes)
    if rank == 0:
        with open(f"{tmp}/result.json", "w") as f:
            json.dump({"core": core, "bpb": bpb}, f)
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank(tok, tmp_path):
    import torch.multiprocessing as mp

    bundle_url = ev.build_smoke_bundle(f"file://{tmp_path}/bundle", write_texts(random.Random(6)), per_task=15)
    tok.save(f"file://{tmp_path}/tok")
    model = tiny_model(tok)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, tok.vocab_size, (8, 32), generator=g)
    y = torch.roll(x, -1, dims=1)
    y[:, -1] = -1
    torch.save((x, y), tmp_path / "batches.pt")
    # fork: the children inherit the imported modules (spawn would re-import torch in each, ~10 s here)
    mp.start_processes(_rank_worker, args=(2, str(tmp_path), bundle_url), nprocs=2, join=True, start_method="fork")
    two = json.loads((tmp_path / "result.json").read_text())
    one_core = ev.evaluate_core(model, tok, ev.load_bundle(bundle_url))
    one_bpb = ev.evaluate_bpb(model, [(x[i:i + 1], y[i:i + 1]) for i in range(8)], 8, torch.tensor(tok.token_bytes()))
    assert two["core"] == json.loads(json.dumps(one_core))  # every accuracy and the score, exactly
    assert two["bpb"] == pytest.approx(one_bpb, rel=1e-12)


# -------------------------------------------------------------------------------------------- the plan


def test_the_eval_stage_is_planned_and_priced():
    train = plan(RunSpec(depth=24, gpus=8, ratio=8, stages=("pretrain", "sft")))
    full = plan(RunSpec(depth=24, gpus=8, ratio=8, stages=("pretrain", "sft", "eval")))
    e = full.stage("eval")
    assert [s.name for s in full.stages] == ["pretrain", "sft", "eval"] and e.steps == 2  # base and chat
    pre, sft = full.stage("pretrain"), full.stage("sft")
    assert e.tokens == pre.eval_tokens + sft.eval_tokens + 90_000 * 1_500  # bpb passes + CORE (assumed size)
    assert e.hours == pytest.approx(e.tokens / (3 * full.estimate.tokens_per_second) / 3600)
    assert e.dollars == pytest.approx(e.hours * 8 * 3.0)
    # Not training: train hours and FLOPs unchanged; the stage's time and dollars land in the "evals" overhead.
    assert full.estimate.train_hours == train.estimate.train_hours and full.total_flops == train.total_flops
    evals = full.estimate.overhead_hours["evals"] - train.estimate.overhead_hours["evals"]
    assert evals == pytest.approx(e.hours)
    ray = full.estimate.overhead_hours["ray_start"] - train.estimate.overhead_hours["ray_start"]
    assert full.estimate.total_dollars == pytest.approx(train.estimate.total_dollars + (evals + ray) * 8 * 3.0)
    capped = plan(RunSpec(depth=24, gpus=8, ratio=8, stages=("pretrain", "eval"), core_max_per_task=100))
    assert capped.stage("eval").tokens == capped.stage("pretrain").eval_tokens + 22 * 100 * 1_500
    assert full.urls["eval_bundle"] == "file://~/.cache/llmctl/eval_bundle"
    assert plan(RunSpec(depth=4, stages=("sft", "eval"), core_bundle="s3://b/core")).stage("eval").tokens == \
        plan(RunSpec(depth=4, stages=("sft", "eval"))).stage("sft").eval_tokens  # no CORE without a base model


@pytest.mark.parametrize("fields,bad", [(dict(stages=("eval",)), "stages"), (dict(core_max_per_task=0), "core_max")])
def test_bad_eval_specs_name_the_field(fields, bad):
    from trainer.plan import PlanError

    with pytest.raises(PlanError, match=f"^{bad}"):
        RunSpec(depth=4, **fields)


# -------------------------------------------------------------------------------------------- the eval stage, for real


def test_the_eval_stage_on_a_local_ray_cluster(finished_run):
    """The session's finished run (tests/finished_run.py) ran pretraining, SFT and then the eval stage's
    `eval_loop` on 2 Ray workers (gloo); check what it left."""
    p = finished_run
    run = p.urls["run"][len("file://"):]
    results = json.loads(open(f"{run}/eval/results.json").read())
    summary = json.loads(open(f"{run}/eval/summary.json").read())
    assert summary["status"] == "completed" and summary["steps"] == 2 and summary["tokens"] == 0
    assert results["world_size"] == 2 and set(results["models"]) == {"base", "chat"}
    base, chat = results["models"]["base"], results["models"]["chat"]
    # The same val tokens as each stage's own last val pass, on the same checkpoint: the same bpb, exactly.
    for model, stage in ((base, "pretrain"), (chat, "sft")):
        trained = json.loads(open(f"{run}/{stage}/summary.json").read())
        assert model["stage"] == stage and model["step"] == trained["steps"]
        assert model["val_bpb"] == trained["val_bpb"]
        assert model["bpb_tokens"] == p.stage(stage).eval_tokens
    core = base["core"]
    assert core["smoke_test"] and [t for t in core["tasks"]] == ["smoke_lm", "smoke_mc", "smoke_schema"]
    assert all(t["examples"] == 24 for t in core["tasks"].values())
    assert core["core"] == pytest.approx(sum(t["centered"] for t in core["tasks"].values()) / 3)
    assert summary["core"] == core["core"] and summary["val_bpb"] == base["val_bpb"]
    base_prompts, chat_prompts = eval_stage.prompts_for(p)  # in-domain prompts for the sample corpus
    assert [s["prompt"] for s in base["samples"]] == list(base_prompts)
    assert [s["prompt"] for s in chat["samples"]] == list(chat_prompts) and "core" not in chat


def test_results_are_exported_as_metrics():
    """The eval stage's figures reach a real /metrics endpoint under the design's names."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from trainer.metrics import RunMetrics

    p = plan(RunSpec(depth=2, gpus=1, gpu_type="cpu", vocab_size=512, seq_len=64, head_dim=64,
                     stages=("pretrain", "eval")))
    entry = {"val_bpb": 1.25, "core": {"core": 0.3, "tasks": {
        "hellaswag": {"centered": 0.2}, "arc_easy": {"centered": 0.4}, "smoke_mc": {"centered": 0.9}}}}
    with RunMetrics(p, "eval", rank=0, local_rank=0, world_size=1, device_name=None, port=0,
                    addr="127.0.0.1") as m:
        eval_stage.export_metrics(m, entry)
        body = urllib.request.urlopen(m.url, timeout=10).read().decode()
    samples = {(s.name, s.labels.get("task")): (s.value, s.labels) for fam in text_string_to_metric_families(body)
               for s in fam.samples if s.name in ("llmctl_val_bpb", "llmctl_core_score", "llmctl_core_task_centered")}
    assert {k: v for k, (v, _) in samples.items()} == {
        ("llmctl_val_bpb", None): 1.25, ("llmctl_core_score", None): 0.3,
        ("llmctl_core_task_centered", "hellaswag"): 0.2, ("llmctl_core_task_centered", "arc_easy"): 0.4}
    assert all(lb["run"] == p.name and lb["stage"] == "eval" and lb["rank"] == "0" for _, lb in samples.values())
    # smoke_mc is not a standard CORE task: no series for it (the label set stays bounded)


def test_hostile_core_yaml_alias_bomb_is_a_bundle_error(tmp_path):
    """A bundle is stored and untrusted: ~700 bytes of nested aliases in core.yaml (which an error message would
    print whole) or nesting 5000 deep is one BundleError, not minutes of work, a traceback or a MemoryError."""
    from tests.cli.kube.test_config_yaml import alias_bomb

    bundle = tmp_path / "bundle"
    (bundle / "eval_data").mkdir(parents=True)
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nt,0\n")
    for text in (alias_bomb().replace("placement:\n  affinity:\n    nodeAffinity:\n", "icl_tasks:\n- label: t\n  x:\n"),
                 "icl_tasks: " + "[" * 5000 + "]" * 5000 + "\n"):
        (bundle / "core.yaml").write_text(text)
        with pytest.raises(ev.BundleError, match="core.yaml is not valid YAML"):
            ev.load_bundle(f"file://{bundle}")


# ---------------------------------------------------------------- hostile input
# (shared helpers: tests/hostile.py)

def test_hostile_core_bundle_dataset_uri_cannot_leave_the_bundle(tmp_path):
    from trainer import evaluate as ev

    (tmp_path / "secret.jsonl").write_text(json.dumps({"context": "OUTSIDE", "continuation": "x"}) + "\n")
    bundle = tmp_path / "bundle"
    (bundle / "eval_data").mkdir(parents=True)
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nt,0\n")
    for uri in ("../../secret.jsonl", "/etc/passwd", "s3://other/x.jsonl"):
        (bundle / "core.yaml").write_text(f"icl_tasks:\n- label: t\n  dataset_uri: {json.dumps(uri)}\n"
                                          "  icl_task_type: language_modeling\n  num_fewshot: [0]\n")
        with pytest.raises(ev.BundleError, match="dataset_uri"):
            ev.load_bundle(f"file://{bundle}")
