"""`llmctl doctor --network --gpus N`: the interconnect check (trainer/netcheck.py) as a short RayJob on the
same worker pods a run of N GPUs gets, compared with the fabric's expected all-reduce bus bandwidth.

The RayJob is the training RayJob's shape (cli/kube/rayjob.py: worker layout, GPU selectors, security, RDMA
resources from the cluster config) with the check as its entrypoint and a short deadline; its log ends with
the ✓/✗ lines and a JSON line (trainer/netcheck.py `result_line`).

The command creates the RayJob and waits for it (bounded by --timeout; --no-wait only creates it), reading
the RayJob's status until it ends, then the submitter pod's log (the driver's output, as `llmctl logs`
shows it). It prints the measured bus bandwidth and latency with ✓/✗ and the likely cause. A ✓ measurement
is stored in the `llmctl-config` ConfigMap under its own key `interconnect.yaml` (the chart owns
`config.yaml`; a merge patch adds the key beside it and `helm upgrade` keeps it), so `llmctl submit` and
`llmctl plan --from-cluster` price multi-node runs at the measured figure and say when it was measured.
The log is untrusted: only the last JSON line is read, every number checked, every string cleaned.
"""

from __future__ import annotations

import datetime
import json
import math

from cli.kube.config import CONFIGMAP, INTERCONNECT_KEY, ClusterConfig
from cli.errors import CLIError
from trainer.plan.interconnect import FABRIC_BUSBW, NODE_GPUS, NVLINK_BUSBW

DEADLINE_SECONDS = 900  # scheduling + image pull + Ray start + a minute of all-reduces
WAIT_SECONDS = DEADLINE_SECONDS + 60  # --timeout's default: the RayJob's own deadline, and KubeRay's turn to say so
NETCHECK = "python -m trainer.netcheck"
MAX_LOG_LINES = 200  # the result is the log's last JSON line; the tail is all that is read


def expected_busbw(gpus: int, cfg: ClusterConfig, given_gbs: float | None = None) -> float:
    """Bytes/s the check should reach: NVLink on one node, else the given or default fabric figure."""
    if given_gbs:
        return given_gbs * 1e9
    return NVLINK_BUSBW if gpus <= cfg.gpus_per_node else FABRIC_BUSBW


def build_netcheck_rayjob(gpus: int, cfg: ClusterConfig, *, namespace: str, expect_gbs: float | None = None,
                          suffix: str | None = None) -> dict:
    """The check's RayJob, named netcheck-<gpus>gpu-<6 random hex> so that a second check (or one while an earlier
    one is still being deleted) never collides. Raises LayoutError/ValueError as build_rayjob does for a bad GPU
    count."""
    import secrets

    from cli.kube.rayjob import build_rayjob
    from trainer.plan import RunSpec, plan

    suffix = suffix or secrets.token_hex(3)
    p = plan(RunSpec(depth=2, gpus=gpus, stages=("pretrain",), num_iterations=1, storage_root=cfg.storage_root,
                     name=f"netcheck-{gpus}gpu-{suffix}", namespace=namespace))
    rj = build_rayjob(p, cfg, namespace=namespace)
    expect = expected_busbw(gpus, cfg, expect_gbs)
    rj["spec"]["entrypoint"] = (f"{NETCHECK} --gpus {gpus} --expect-gbs {expect / 1e9:g} "
                                f"--node-gpus {cfg.gpus_per_node or NODE_GPUS}")
    rj["spec"]["activeDeadlineSeconds"] = DEADLINE_SECONDS
    rj["spec"].pop("backoffLimit", None)  # a failed check is an answer, not something to retry
    rj["metadata"]["annotations"] = {"llmctl.dev/check": "network"}
    return rj


def cmd_network(args) -> int:
    """`llmctl doctor --network`: print the check's RayJob (--dry-run), or create it, wait for its result,
    print ✓/✗ and store a ✓ figure in the cluster config. Exit 0 on ✓, 1 on ✗ or no result."""
    from cli.console import say, to_yaml
    from cli.errors import UsageError
    from cli.kube.client import connect, read_config, resolve_namespace
    from cli.kube.config import load_config_file
    from cli.kube.layout import LayoutError
    from cli.kube.runs import GROUP, PLURAL, VERSION

    if not args.gpus or args.gpus < 2:
        raise UsageError("doctor --network: --gpus must be at least 2 (an all-reduce needs two ranks)")
    timeout = WAIT_SECONDS if args.timeout is None else args.timeout
    if not (math.isfinite(timeout) and timeout > 0):
        raise UsageError(f"doctor --network: --timeout must be a number of seconds > 0, got {args.timeout:g}")
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
              what=f"create RayJob {name}", verb="create", resource=PLURAL, name=name, group=GROUP,
              exists_hint="run `llmctl doctor --network` again (each check picks a new name)")
    say(*(f"warning: {w}" for w in warnings),
        f"rayjob.ray.io/{name} created: it measures all-reduce bandwidth over {args.gpus} GPUs")
    if args.no_wait:
        say(f"next: llmctl logs {name} -n {kube.namespace} -f   (then: llmctl plan --interconnect-gbs <busbw_gbs>)")
        return 0
    result = wait_for_result(kube, name, timeout)
    print("\n".join(result_lines(result)))
    if not result["ok"]:
        say(f"not stored in the cluster config: fix the cause and run the check again (to price runs on this "
            f"fabric as it is: llmctl plan --interconnect-gbs {result['busbw_gbs']:.3g})")
        return 1
    store_measurement(kube, result, gpus=args.gpus, rayjob=name)
    return 0


def wait_for_result(kube, name: str, timeout: float) -> dict:
    """Poll the RayJob until it has ended (bounded by `timeout`), then read its result from the submitter's log."""
    from cli.console import clean, say, wait_until
    from cli.kube.runs import describe, get_run

    seen: dict = {}

    def ended() -> bool:
        state, detail = describe(get_run(kube, name))
        detail = clean(detail, limit=300)  # the status message is the cluster's text
        if state != seen.get("state"):
            say(f"{name}: {state}: {detail}")
        seen.update(state=state, detail=detail)
        return state in ("succeeded", "failed", "stopped")

    if not wait_until(ended, timeout=timeout):
        raise CLIError(f"the check did not finish within {timeout:.0f} s (--timeout); RayJob {name} is still "
                       f"{seen.get('state', 'pending')}: llmctl status {name} -n {kube.namespace}, llmctl logs {name}")
    result = parse_result(read_submitter_log(kube, name))
    if result is None:
        raise CLIError(f"RayJob {name} ended {seen['state']} ({seen['detail']}) without a valid result line in its "
                       f"log; see llmctl logs {name} -n {kube.namespace}")
    return result


def read_submitter_log(kube, name: str) -> str:
    """The tail of the newest submitter pod's log (the driver's output); '' when there is no such pod."""
    from cli.kube.pods import CONTAINERS

    pods = kube.call(kube.core.list_namespaced_pod, kube.namespace,
                     label_selector=f"llmctl.dev/run={name},llmctl.dev/role=submitter",
                     what=f"find the submitter pod of {name}", verb="list", resource="pods")
    items = kube.api_client.sanitize_for_serialization(pods).get("items", [])
    if not items:
        return ""
    items.sort(key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]), reverse=True)
    pod = items[0]["metadata"]["name"]
    text = kube.call(kube.core.read_namespaced_pod_log, pod, kube.namespace, container=CONTAINERS["submitter"],
                     tail_lines=MAX_LOG_LINES, what=f"read the log of {pod}", verb="get", resource="pods/log",
                     name=pod)
    return text if isinstance(text, str) else ""


def parse_result(log: str) -> dict | None:
    """The last JSON line of the check's log, validated (it is untrusted); None when there is none."""
    from cli.console import clean

    for line in reversed(log.splitlines()[-MAX_LOG_LINES:]):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if not isinstance(doc, dict) or "busbw_gbs" not in doc:
            continue
        nums = {k: doc.get(k) for k in ("busbw_gbs", "latency_us", "expected_gbs")}
        if not isinstance(doc.get("ok"), bool) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v < 1e9
                for v in nums.values()):
            return None  # a result line with a bad field: refuse it rather than store a made-up figure
        count = {k: doc.get(k) if isinstance(doc.get(k), int) and not isinstance(doc.get(k), bool) else None
                 for k in ("world", "nodes")}
        cause = doc.get("cause")
        return {"ok": doc["ok"], **{k: float(v) for k, v in nums.items()}, **count,
                "backend": clean(doc.get("backend") or "?", limit=20),
                "cause": clean(cause, limit=300) if isinstance(cause, str) else None}
    return None


def result_lines(r: dict) -> list[str]:
    """✓/✗ on the bus bandwidth against the expected figure, the latency, and the likely cause."""
    where = f" over {r['world']} ranks" if r["world"] else ""
    where += f" on {r['nodes']} node(s)" if r["nodes"] else ""
    lines = [f"{'✓' if r['ok'] else '✗'} all-reduce bus bandwidth {r['busbw_gbs']:.1f} GB/s{where} ({r['backend']}); "
             f"expected ~{r['expected_gbs']:.0f} GB/s",
             f"  latency {r['latency_us']:.0f} us per small all-reduce"]
    if not r["ok"]:
        lines.append(f"  likely cause: {r['cause'] or 'not given'}")
    return lines


def store_measurement(kube, r: dict, *, gpus: int, rayjob: str, now: datetime.datetime | None = None) -> None:
    """Merge-patch the measured figure into the ConfigMap's INTERCONNECT_KEY; a missing ConfigMap or a missing
    permission is a warning with the flag to use instead, never a failure of the check."""
    import yaml
    from kubernetes.client.rest import ApiException

    from cli.console import say

    now = now or datetime.datetime.now(datetime.timezone.utc)
    doc = {"busbwGBs": round(r["busbw_gbs"], 2), "latencyUs": round(r["latency_us"], 1),
           "measuredAt": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "gpus": gpus, "rayjob": rayjob}
    ClusterConfig(interconnect_busbw_gbs=doc["busbwGBs"], interconnect_measured_at=doc["measuredAt"],
                  interconnect_gpus=gpus)  # what readers will check
    try:
        kube.core.patch_namespaced_config_map(CONFIGMAP, kube.namespace,
                                              {"data": {INTERCONNECT_KEY: yaml.safe_dump(doc, sort_keys=False)}},
                                              _request_timeout=(10, 60))
    except ApiException as e:
        why = {404: f"no ConfigMap {CONFIGMAP} in namespace {kube.namespace} (install the chart)",
               403: f"patch on configmaps/{CONFIGMAP} is not granted (the chart's -submit Role grants it)"}
        say(f"warning: not stored in the cluster config: {why.get(e.status, f'HTTP {e.status}')}; plan with "
            f"--interconnect-gbs {doc['busbwGBs']:g}")
        return
    say(f"stored in ConfigMap {CONFIGMAP} ({INTERCONNECT_KEY}): {doc['busbwGBs']:g} GB/s measured "
        f"{doc['measuredAt'][:10]}; llmctl submit and llmctl plan --from-cluster now use it")
