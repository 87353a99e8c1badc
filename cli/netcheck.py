"""`llmctl doctor --network --gpus N`: the interconnect check (trainer/netcheck.py) as a short RayJob on the
same worker pods a run of N GPUs gets, compared with the fabric's expected all-reduce bus bandwidth.

The RayJob is the training RayJob's shape (cli/rayjob.py: worker layout, GPU selectors, security, RDMA
resources from the cluster config) with the check as its entrypoint and a short deadline; its logs end with
the ✓/✗ lines and a JSON line whose `busbw_gbs` is what `llmctl plan --interconnect-gbs` takes.
"""

from __future__ import annotations

from cli.clusterconfig import ClusterConfig
from trainer.network import FABRIC_BUSBW, NODE_GPUS, NVLINK_BUSBW

DEADLINE_SECONDS = 900  # scheduling + image pull + Ray start + a minute of all-reduces
NETCHECK = "python -m trainer.netcheck"


def expected_busbw(gpus: int, cfg: ClusterConfig, given_gbs: float | None = None) -> float:
    """Bytes/s the check should reach: NVLink on one node, else the given or default fabric figure."""
    if given_gbs:
        return given_gbs * 1e9
    return NVLINK_BUSBW if gpus <= cfg.gpus_per_node else FABRIC_BUSBW


def build_netcheck_rayjob(gpus: int, cfg: ClusterConfig, *, namespace: str, expect_gbs: float | None = None) -> dict:
    """The check's RayJob. Raises LayoutError/ValueError as build_rayjob does for a bad GPU count."""
    from cli.rayjob import build_rayjob
    from trainer.plan import RunSpec, plan

    p = plan(RunSpec(depth=2, gpus=gpus, stages=("pretrain",), num_iterations=1, storage_root=cfg.storage_root,
                     name=f"netcheck-{gpus}gpu", namespace=namespace))
    rj = build_rayjob(p, cfg, namespace=namespace)
    expect = expected_busbw(gpus, cfg, expect_gbs)
    rj["spec"]["entrypoint"] = (f"{NETCHECK} --gpus {gpus} --expect-gbs {expect / 1e9:g} "
                                f"--node-gpus {cfg.gpus_per_node or NODE_GPUS}")
    rj["spec"]["activeDeadlineSeconds"] = DEADLINE_SECONDS
    rj["spec"].pop("backoffLimit", None)  # a failed check is an answer, not something to retry
    rj["metadata"]["annotations"] = {"llmctl.dev/check": "network"}
    return rj


def cmd_network(args) -> int:
    """`llmctl doctor --network`: print the check's RayJob (--dry-run) or create it; its logs carry ✓/✗."""
    from cli.cluster import connect, load_config_file, read_config, resolve_namespace
    from cli.errors import UsageError
    from cli.jobs import GROUP, PLURAL, VERSION, say
    from cli.rayjob import LayoutError, to_yaml

    if not args.gpus or args.gpus < 2:
        raise UsageError("doctor --network: --gpus must be at least 2 (an all-reduce needs two ranks)")
    file_cfg, warnings = load_config_file(args.cluster_config) if args.cluster_config else (None, [])
    namespace = resolve_namespace(args)
    kube = None
    if file_cfg is None and not args.dry_run:
        kube = connect(args)
        file_cfg, warnings = read_config(kube)
    cfg = file_cfg or ClusterConfig()
    try:
        rj = build_netcheck_rayjob(args.gpus, cfg, namespace=namespace, expect_gbs=args.expect_gbs)
    except (LayoutError, ValueError) as e:
        raise UsageError(str(e)) from None
    if args.dry_run:
        print(to_yaml([rj]))
        return 0
    kube = kube or connect(args)
    name = rj["metadata"]["name"]
    kube.call(kube.custom.create_namespaced_custom_object, GROUP, VERSION, kube.namespace, PLURAL, rj,
              what=f"create RayJob {name}", verb="create", resource=PLURAL, name=name, group=GROUP)
    say(*(f"warning: {w}" for w in warnings),
        f"rayjob.ray.io/{name} created: it measures all-reduce bandwidth over {args.gpus} GPUs and prints ✓/✗",
        f"next: llmctl logs {name} -n {kube.namespace} -f   (then: llmctl plan --interconnect-gbs <busbw_gbs>)")
    return 0
