"""`llmctl doctor --gpu-health`: GPU nodes with problems, from what the cluster already says about them, and
`submit --avoid-bad-nodes`: a run's workers kept off the nodes its ranks recorded (trainer/gpu_health.py).

A node is listed when any of these hold (read with `list nodes` and `list events`, nothing installed):
- fewer allocatable than capacity `nvidia.com/gpu`: the NVIDIA device plugin withdrew a GPU it saw fail;
- a node condition that is not one of the kubelet's own and is True (node-problem-detector, NVSentinel and
  similar remediation write conditions such as `GpuXidError`, `GPUUnhealthy`), or a condition named for a GPU
  that says it is not healthy (`...Healthy`/`...Ready` False);
- a NoSchedule/NoExecute taint other than the GPU pools' conventional `nvidia.com/gpu` one (remediation taints a
  node it is draining), or the node is cordoned;
- a recent Event on the node whose reason or message names an Xid (node-problem-detector's kernel monitor).
DCGM exporter metrics (Xid, ECC, throttling) are on the fleet dashboard's DCGM panels where the exporter runs.
"""

from __future__ import annotations

import json
import re

KUBELET_CONDITIONS = {"Ready", "MemoryPressure", "DiskPressure", "PIDPressure", "NetworkUnavailable"}
# NVRM's kernel line: "NVRM: Xid (PCI:0000:0f:00): 79, pid=..., ..."; monitors also write "Xid 79" or "Xid: 79".
XID = re.compile(r"\bXid\b(?:\s*\(PCI:[0-9A-Fa-f:.]+\))?\s*:?\s*(\d+)", re.I)


def node_problems(node: dict, events: list[dict] = ()) -> list[str]:
    meta, spec, st = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
    out = []
    cap = int((st.get("capacity") or {}).get("nvidia.com/gpu", "0") or 0)
    alloc = int((st.get("allocatable") or {}).get("nvidia.com/gpu", "0") or 0)
    if cap and alloc < cap:
        out.append(f"{cap - alloc} of {cap} GPUs withdrawn by the device plugin")
    for c in st.get("conditions") or []:
        t, status = c.get("type", ""), c.get("status")
        positive = bool(re.search(r"(healthy|ready)$", t, re.I))  # a condition that should be True
        if t == "Ready":
            bad = status != "True"
        elif t in KUBELET_CONDITIONS:
            bad = False  # the kubelet's own pressure conditions: not a GPU matter
        else:
            bad = status == ("False" if positive else "True")
        if bad:
            out.append(f"condition {t}={status}" + (f": {c['message']}" if c.get("message") else ""))
    for t in spec.get("taints") or []:
        if t.get("effect") in ("NoSchedule", "NoExecute") and t.get("key") != "nvidia.com/gpu" \
                and t.get("key") != "node.kubernetes.io/unschedulable":
            out.append(f"taint {t['key']}{'=' + t['value'] if t.get('value') else ''}:{t['effect']}")
    if spec.get("unschedulable"):
        out.append("cordoned")
    seen = set()
    for e in events:
        obj = e.get("involvedObject") or {}
        if obj.get("kind") != "Node" or obj.get("name") != meta.get("name"):
            continue
        m = XID.search(f"{e.get('reason', '')} {e.get('message', '')}")
        if m and m[1] not in seen:
            seen.add(m[1])
            out.append(f"Xid {m[1]} ({e.get('reason', 'event')}, {e.get('count', 1)}x): "
                       f"{(e.get('message') or '').strip()[:120]}")
    return out


def gpu_health(kube) -> list[dict]:
    """[{node, gpus, problems}] for every node with nvidia.com/gpu capacity, problems first."""
    nodes = kube.call(kube.core.list_node, what="list nodes", verb="list", resource="nodes")
    nodes = kube.api_client.sanitize_for_serialization(nodes).get("items", [])
    try:
        events = kube.core.list_event_for_all_namespaces(field_selector="involvedObject.kind=Node",
                                                         _request_timeout=(10, 60))
        events = kube.api_client.sanitize_for_serialization(events).get("items", [])
    except Exception:  # noqa: BLE001 - events are a bonus; nodes are the check
        events = []
    rows = []
    for n in nodes:
        cap = int(((n.get("status") or {}).get("capacity") or {}).get("nvidia.com/gpu", "0") or 0)
        if not cap:
            continue
        rows.append({"node": n["metadata"]["name"], "gpus": cap, "problems": node_problems(n, events)})
    rows.sort(key=lambda r: (not r["problems"], r["node"]))
    return rows


def cmd_gpu_health(args) -> int:
    from cli.console import clean, say
    from cli.kube.client import connect

    rows = gpu_health(connect(args))
    bad = [r for r in rows if r["problems"]]
    if args.output == "json":
        print(json.dumps({"ok": not bad, "nodes": rows}, indent=2))
        return 1 if bad else 0
    if not rows:
        say("no GPU nodes (no node has nvidia.com/gpu capacity)")
        return 0
    width = max(len(r["node"]) for r in rows)
    for r in rows:
        mark = "✗" if r["problems"] else "✓"
        print(clean(f"{mark} {r['node']:<{width}}  {r['gpus']} GPUs  " + ("; ".join(r["problems"]) or "healthy")))
    say(f"{len(bad)} of {len(rows)} GPU node(s) with problems" if bad else f"all {len(rows)} GPU nodes healthy")
    return 1 if bad else 0


def keep_off_bad_nodes(p, rayjob: dict) -> list[str]:
    """Give the RayJob's workers an anti-affinity to the nodes the run recorded; lines for the plan's notes."""
    from trainer.gpu_health import bad_nodes, exclude_nodes

    from cli.errors import CLIError

    try:
        nodes = bad_nodes(p.urls["run"])
    except Exception as e:  # noqa: BLE001 - asked for explicitly: say why it could not be done
        raise CLIError(f"--avoid-bad-nodes: cannot read {p.urls['run']}/bad-nodes.json ({type(e).__name__}: "
                       f"{e})") from None
    if not nodes:
        return []
    for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        exclude_nodes(group["template"]["spec"], nodes)
    return [f"keeping workers off {len(nodes)} node(s) this run recorded as failing: "
            + ", ".join(f"{n} ({v.get('kind', '?')})" for n, v in sorted(nodes.items()))]
