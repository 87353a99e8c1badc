"""A trained run's model and tokenizer, from storage: the one loader behind `llmctl chat`, `llmctl serve` and the
eval stage.

Everything read here is untrusted (anyone who can write the bucket wrote it), so the order matters:
1. `read_checked_plan`: plan.json read bounded, a JSON object whose name is a DNS-1035 label as RunSpec
   requires, its shape, stages and tokenizer URL checked (trainer/plan/stored_plan.py) before anything is
   allocated from it;
2. `checkpoint_url`: the newest whole checkpoint of a stage (or the one at a given step); `hf_export`: the
   stage's Hugging Face export instead, for engines that load that format (vLLM);
3. `load_model`: its weights with `torch.load(weights_only=True)` (nothing unpickled) into a model of the
   checked shape, in eval mode; weights that do not fit the shape are refused, not half-loaded;
4. `load_tokenizer`: the tokenizer from its text/JSON files.
`load_run` chains them. Each failure is a `RunLoadError` with one line that names the run and what is missing;
the callers word it for their users (a usage error for chat, a failed replica for serve, a failed stage for eval).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_PLAN_BYTES = 1 << 20  # a plan.json is ~10 KB; a MiB bounds a hostile one


class RunLoadError(LookupError):
    """The run, its stage, its checkpoint, its weights or its tokenizer cannot be loaded (the message says which)."""


class NoHFExport(RunLoadError):
    """The stage has no Hugging Face export at `url` (so a caller can say how to make one)."""

    def __init__(self, message: str, url: str):
        super().__init__(message)
        self.url = url


@dataclass(frozen=True)
class CheckedPlan:
    plan: dict  # the stored plan as read (not re-planned: a run made by an older version still opens)
    arch: object  # trainer.plan.shape.Architecture, re-derived from the stored shape
    stages: list[str]
    tokenizer_url: str

    @property
    def name(self) -> str:  # checked by read_checked_plan: a DNS-1035 label
        return str(self.plan.get("name"))


@dataclass(frozen=True)
class LoadedRun:
    plan: dict
    model: object  # trainer.model.GPT, eval mode
    tokenizer: object  # trainer.data.tokenizer.Tokenizer
    stage: str
    step: int
    checkpoint: str  # URL of the checkpoint loaded


def read_checked_plan(run_url: str, storage_options: dict | None = None) -> CheckedPlan:
    """The run's plan.json, bounded and checked before use."""
    from trainer.plan import stored_plan
    from trainer.storage import DocumentTooLarge, read_small_json

    try:
        plan = read_small_json(f"{run_url}/plan.json", MAX_PLAN_BYTES, storage_options)
    except DocumentTooLarge as e:
        raise RunLoadError(str(e)) from None
    except ValueError as e:
        raise RunLoadError(f"run at {run_url}: plan.json is not valid JSON ({e})") from None
    if plan is None:
        raise RunLoadError(f"no run at {run_url} (no plan.json there)")
    try:
        stored_plan.run_name(plan)  # an object, named as RunSpec names runs: it names Kubernetes objects, is printed
        return CheckedPlan(plan=plan, arch=stored_plan.architecture(plan), stages=stored_plan.stage_names(plan),
                           tokenizer_url=stored_plan.tokenizer_url(plan, run_url))
    except stored_plan.StoredPlanError as e:
        raise RunLoadError(f"run at {run_url}: {e}") from None


def checkpoint_url(run_url: str, checked: CheckedPlan, stage: str, step: int | None = None,
                   storage_options: dict | None = None) -> str:
    """URL of the stage's newest whole checkpoint, or the one at `step`."""
    from trainer import checkpoint

    if stage not in checked.stages:
        raise RunLoadError(f"run {checked.name} has no {stage} stage (it has {', '.join(checked.stages)})")
    url = checkpoint.latest(f"{run_url}/{stage}", storage_options=storage_options, step=step)
    if url is None:
        which = f"at step {step}" if step is not None else "yet"
        raise RunLoadError(f"run {checked.name} has no whole {stage} checkpoint {which} under {run_url}/{stage}")
    return url


MAX_HF_CONFIG_BYTES = 1 << 20  # a Hugging Face config.json is a few KB; a MiB bounds a hostile one
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")  # one file, or the index of its shards


def hf_export(run_url: str, checked: CheckedPlan, stage: str, storage_options: dict | None = None) -> str:
    """URL of the stage's Hugging Face export (`llmctl export`, at trainer/plan/urls.py `hf_export_url`), after
    checking it is one: a config.json that is a JSON object (read bounded) and the safetensors weights."""
    from trainer.plan.urls import hf_export_url
    from trainer.storage import DocumentTooLarge, filesystem, read_small_json

    if stage not in checked.stages:
        raise RunLoadError(f"run {checked.name} has no {stage} stage (it has {', '.join(checked.stages)})")
    url = hf_export_url(run_url, stage)
    try:
        config = read_small_json(f"{url}/config.json", MAX_HF_CONFIG_BYTES, storage_options)
    except (DocumentTooLarge, ValueError) as e:
        raise RunLoadError(f"run {checked.name}: {url}/config.json is not a model config ({e})") from None
    if config is None:
        raise NoHFExport(f"run {checked.name} has no Hugging Face export of its {stage} stage at {url}", url)
    if not isinstance(config, dict):
        raise RunLoadError(f"run {checked.name}: {url}/config.json is not a JSON object")
    fs, path = filesystem(url, storage_options)
    if not any(fs.exists(f"{path}/{name}") for name in HF_WEIGHTS):
        raise RunLoadError(f"run {checked.name}: the export at {url} has no {' or '.join(HF_WEIGHTS)}")
    return url


def device_for(device: str = "auto"):
    """torch.device for "auto" (CUDA when present, else CPU) or a name."""
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def load_model(url: str, arch, device, storage_options: dict | None = None):
    """(model in eval mode, checkpoint step): the weights at `url`, weights-only, into a model of shape `arch`."""
    from trainer import checkpoint
    from trainer.model import build_model

    try:
        state, meta = checkpoint.load_model_state(url, storage_options=storage_options, device=device)
        model = build_model(arch, device, compile=False)
        model.load_state_dict(state)
    except checkpoint.CheckpointError as e:
        raise RunLoadError(str(e)) from None
    except (RuntimeError, ValueError, KeyError, TypeError) as e:  # weights that do not fit the shape
        raise RunLoadError(f"checkpoint {url} does not fit the run's model "
                           f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    model.eval()
    return model, meta.step


def load_tokenizer(url: str, storage_options: dict | None = None):
    """The run's tokenizer from its text/JSON files."""
    from trainer.data.tokenizer import Tokenizer, TokenizerError

    try:
        return Tokenizer.load(url, storage_options=storage_options)
    except (TokenizerError, OSError) as e:
        raise RunLoadError(str(e)) from None


def match_vocabulary(model, tokenizer) -> None:
    """Let the model emit only ids the tokenizer can decode. A tokenizer trained on a small corpus can hold fewer
    ids than the plan's vocabulary (Tokenizer.train: too few merges), so the model's logits are cropped to the
    tokenizer's ids (the rows above were never a training target); one with more ids than the model is not the
    run's tokenizer, and is refused."""
    import dataclasses

    have, model_vocab = tokenizer.vocab_size, model.arch.vocab_size
    if have > model_vocab:
        raise RunLoadError(f"the tokenizer has {have:,} ids but the model only {model_vocab:,}: it is not this "
                           "run's tokenizer")
    if have < model_vocab:
        model.arch = dataclasses.replace(model.arch, vocab_size=have)


def load_run(run_url: str, stage: str = "sft", step: int | None = None, *, storage_options: dict | None = None,
             device: str = "auto", checked: CheckedPlan | None = None) -> LoadedRun:
    """A run's stage: plan, model (eval mode), tokenizer and the step loaded. `checked`: a plan already read."""
    checked = checked or read_checked_plan(run_url, storage_options)
    url = checkpoint_url(run_url, checked, stage, step, storage_options)
    model, loaded_step = load_model(url, checked.arch, device_for(device), storage_options)
    tokenizer = load_tokenizer(checked.tokenizer_url, storage_options)
    match_vocabulary(model, tokenizer)
    return LoadedRun(plan=checked.plan, model=model, tokenizer=tokenizer, stage=stage, step=loaded_step,
                     checkpoint=url)
