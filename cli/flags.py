"""Command-line flags that several commands share, kept apart from what the flags do so that building the
parser (`llmctl --help`) imports nothing heavy: the spec flags (`plan`, `submit`), the cluster flags (every
command that talks to a cluster) and `--kuberay-version` (`submit`, `sweep`), and `apply_flags`, which applies
--image, --queue and --kuberay-version to a cluster config.
"""

from __future__ import annotations

import argparse

from cli.errors import UsageError


def add_spec_args(p: argparse.ArgumentParser) -> None:
    """What to train, where and at what price: `plan` and `submit` (cli/planning.py `spec_from_args` reads them)."""
    from trainer.plan.catalog import GPUS
    from trainer.plan.recipe import STAGES

    g = p.add_argument_group("what to train")
    g.add_argument("--depth", type=int, required=True, help="transformer layers; sets every other hyperparameter")
    g.add_argument("--ratio", type=float, default=12.0, help="training tokens per scaling parameter (default 12)")
    g.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    g.add_argument("--precision", default="bf16", choices=("bf16", "fp8"), help="matmul precision (default bf16)")
    g.add_argument("--fp8", action="store_const", const="fp8", dest="precision",
                   help="train with fp8 matmuls (tensorwise scaling, Hopper GPUs): same as --precision fp8")
    g.add_argument("--seq-len", type=int, default=2048, help="context length in tokens (default 2048)")
    g.add_argument("--device-batch-size", type=int,
                   help="sequences per GPU per micro-step (default: the largest power of two that fits in memory)")
    g.add_argument("--total-batch-size", type=int, help="tokens per optimizer step (default: Power-Lines rule)")
    g.add_argument("--num-iterations", type=int, help="fix the step count instead of using --ratio")
    g.add_argument("--core-bundle", help="CORE eval bundle URL (core.yaml, eval_data/, eval_meta_data.csv); "
                   "default <storage>/eval_bundle")
    g.add_argument("--core-max-per-task", type=int, help="CORE examples per task in the eval stage (default all)")
    g.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-eval-harness tasks the eval stage also runs "
                   "on the base model, through its Hugging Face export (docs/export.md)")
    g = p.add_argument_group("where and at what price")
    g.add_argument("--gpus", type=int, default=1, help="GPUs in total (8 per worker pod)")
    g.add_argument("--gpu-type", default="h100", help=f"one of {', '.join(GPUS)} (default h100)")
    g.add_argument("--price", type=float, help="$ per GPU-hour (default: the GPU type's catalog price)")
    g.add_argument("--min-gpus", type=int, help="elastic: go on with as few as this many GPUs when pods are lost "
                   "(same total batch; the checkpoint is re-sharded)")
    g.add_argument("--spot", action="store_true", help="run on spot/preemptible nodes; shows spot vs on-demand cost")
    g.add_argument("--preemptions-per-hour", type=float,
                   help="expected preemptions per node-hour (default: the catalog's prior, trainer/plan/spot.py)")
    g.add_argument("--max-cost", type=float, help="budget cap in $: refuse plans above it; the run stops there")
    g.add_argument("--interconnect-gbs", type=float, metavar="GB/S",
                   help="inter-node all-reduce bus bandwidth per GPU (llmctl doctor --network measures it; "
                        "default: 8x400G InfiniBand/EFA, 300)")
    g.add_argument("--storage", default="file://~/.cache/llmctl", help="storage root URL (s3://bucket/prefix)")
    g.add_argument("--name", help="run name (default: derived from the spec, stable across retries)")


def add_cluster_args(p) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("-n", "--namespace", help="namespace (default: the kubeconfig context's, else 'default')")
    g.add_argument("--context", help="kubeconfig context (default: the current context)")
    g.add_argument("--kubeconfig", help="kubeconfig file(s), ':'-separated (default: $KUBECONFIG or ~/.kube/config)")


def add_version_args(g) -> None:
    """`submit --kuberay-version X.Y`: render for that KubeRay release without asking the cluster (wired by
    cli/submit.py's parser; `version_flags` turns it into a config change)."""
    g.add_argument("--kuberay-version", metavar="X.Y", help="render for this KubeRay release (default: read "
                   "from the cluster's CRDs, else kuberay.version in the cluster config, else the newest supported)")


def version_flags(args) -> dict:
    """Config changes from add_version_args' flags, checked: a bad or unsupported version is a UsageError."""
    from cli.kube.versions import kuberay_release

    value = getattr(args, "kuberay_version", None)
    if value is None:
        return {}
    try:
        kuberay_release(value)
    except ValueError as e:
        raise UsageError(f"--kuberay-version: {e}") from None
    return {"kuberay_version": value}


def apply_flags(cfg, args):
    """The cluster config with --image, --queue and --kuberay-version applied (`submit`, `sweep`)."""
    changes = {}
    if getattr(args, "image", None):
        changes["image"] = args.image
    if getattr(args, "queue", None) is not None:
        changes["queue"] = args.queue or None  # --queue '' turns a configured queue off
    changes.update(version_flags(args))
    return cfg.replace(**changes) if changes else cfg
