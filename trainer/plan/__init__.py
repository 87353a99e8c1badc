"""The planner: from one dial (`--depth`) to every number a run needs, with its price. Torch-free.

The CLI imports this package, so it imports nothing but the standard library and its own modules (an
import contract in pyproject.toml holds it to that):

    spec.py          RunSpec: what the user asks for, validated field by field (PlanError names the field)
    recipe.py        the recipe's constants, each with its source
    shape.py         depth -> widths, heads, windows, parameter counts, FLOPs per token
    batch.py         tokens per step, device batch x accumulation, the same plan on another world size
    schedule.py      learning rates and weight decay after scaling; LR, momentum and WD by step
    catalog.py       GPUs: peaks, memory, prices, the MFU prior
    pricing.py       hours and dollars: the one dollars formula, fixed overheads
    spot.py          spot vs on-demand, preemptions, the Young/Daly checkpoint interval
    memory.py        peak memory per GPU; the largest device batch that fits
    interconnect.py  the all-reduce share of a step across nodes
    urls.py          rules for untrusted URLs and stored names
    credentials.py   credentials recognised by name and by value (refused in specs and configs)
    stored_plan.py   a stored plan.json checked before use
    runplan.py       RunPlan and `plan()`: the assembly
    sweep.py         scaling-law sweeps: the grid of pretrain-only cells; depth and ratio from a stored fit

`from trainer.plan import plan, RunSpec, RunPlan, PlanError` is the front door.
"""

__all__ = ["SCHEMA", "PlanError", "RunPlan", "RunSpec", "StagePlan", "plan"]

_HOMES = {"SCHEMA": "runplan", "RunPlan": "runplan", "StagePlan": "runplan", "plan": "runplan",
          "PlanError": "spec", "RunSpec": "spec"}


def __getattr__(name: str):
    """The front door's names, imported on first use (PEP 562): `llmctl --help` imports one light module of
    this package (the GPU catalog, the stage names) without paying for the whole planner."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value
    return value
