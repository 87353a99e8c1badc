"""`llmctl status | list | logs | cancel`: the runs on Kubernetes (KubeRay RayJobs that `llmctl submit`
created), in plain words.

A thin layer over the kubernetes client: each command parses, makes a few API calls and prints. Results go
to stdout; warnings and next steps go to stderr, so `-o json` output stays parseable. Reading a run back
(`get_run`, `describe`, `summary`) is cli/kube/runs.py; the cluster is reached only inside the commands.
"""

from __future__ import annotations

import json
import sys

from cli import console
from cli.console import clean, confirm, dump_json, fmt_hours, require_yes, say, wait_until
from cli.errors import CLIError
from cli.flags import add_cluster_args

IDLE_AFTER = "2h"  # `list --idle-after`'s default (cli/idle.py); the same window as the LlmctlRayClusterIdle alert


# ---------------------------------------------------------------------------------------------
# status and list: RayJob status in plain words


def _age(seconds: float) -> str:
    for unit, div in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= div:
            return f"{seconds / div:.0f}{unit}" if unit != "h" else f"{seconds / 3600:.1f}h"
    return f"{seconds:.0f}s"


def _pods_line(pods: list[dict]) -> str | None:
    """'head Running; worker 1 Running, 1 Pending (0/12 nodes are available: ...)'."""
    by_role: dict[str, list[dict]] = {}
    for pod in pods:
        role = (pod["metadata"].get("labels") or {}).get("llmctl.dev/role", "other")
        by_role.setdefault(role, []).append(pod)
    parts = []
    for role in ("head", "worker", "submitter"):
        phases: dict[str, int] = {}
        why = ""
        for pod in by_role.get(role, []):
            phase = (pod.get("status") or {}).get("phase", "Unknown")
            phases[phase] = phases.get(phase, 0) + 1
            for c in (pod.get("status") or {}).get("conditions") or []:
                if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("message"):
                    why = f" ({c['message']})"
        if phases:
            parts.append(f"{role} " + ", ".join(f"{n} {ph}" for ph, n in sorted(phases.items())) + why)
    return "; ".join(parts) or None


def cmd_status(args) -> int:
    from cli.kube.client import connect
    from cli.kube.runs import get_run, summary

    if args.local:  # a run's storage alone, no cluster (cli/runview.py)
        from cli.runview import cmd_status_local

        return cmd_status_local(args)
    kube = connect(args)
    try:
        rj = get_run(kube, args.run)
    except CLIError as e:  # not a run: maybe a service (llmctl serve)
        from cli.kube.rayservice import get_service, service_status_lines, service_summary

        svc = get_service(kube, args.run) if f"no rayjob {args.run!r}" in str(e) else None
        if svc is None:
            raise
        s = service_summary(svc)
        print(dump_json(s) if args.output == "json" else clean(service_status_lines(s), newlines=True))
        return 0
    s = summary(rj)
    if not args.no_storage:
        from cli.runview import add_storage_view

        add_storage_view(s)
        if s.get("storage_error"):
            say(clean(f"warning: could not read progress and spend from {s['storage']}: {s['storage_error']} "
                      f"(--no-storage skips it)"))  # the storage URL is the RayJob's annotation: untrusted
    if s["state"] in ("submitted", "queued", "starting", "running", "retrying"):
        from cli.kube.runs import reasons

        pods = kube.call(kube.core.list_namespaced_pod, kube.namespace, label_selector=f"llmctl.dev/run={args.run}",
                         what=f"list the pods of {args.run}", verb="list", resource="pods")
        items = kube.api_client.sanitize_for_serialization(pods).get("items", [])
        s["pods"] = _pods_line(items)
        # why it waits: the Kueue Workload while queued, else the RayCluster's conditions, the pods' conditions
        # and the Warning events about any of them (the scheduler, KubeRay, admission)
        s["why"] = reasons(kube, rj, s["state"], items) if s["state"] != "running" else []
    if s["state"] == "queued":  # waiting for capacity or quota, or requeued (cli/kube/capacity.py)
        from cli.kube.capacity import queue_reason

        if why := queue_reason(kube, args.run):
            s["waiting"] = why
    if args.output == "json":
        print(dump_json(s))
        return 0
    rows = [("run", f"{s['name']} (namespace {s['namespace']})"), ("state", f"{s['state']}: {s['detail']}")]
    if s.get("waiting"):
        rows.append(("waiting", s["waiting"]))
    if s["depth"] is not None:
        rows.append(("model", f"d{s['depth']} on {s['gpus']} x {s['gpu_type']}"))
    if s.get("pods"):
        rows.append(("pods", s["pods"]))
    for line in s.get("why") or []:
        rows.append(("why", line))
    if s["started"]:
        rows.append(("time", f"{fmt_hours(s['elapsed_hours'])} since {s['started']}"
                             + (f" (estimate {fmt_hours(s['estimate_hours'])})" if s["estimate_hours"] else "")))
    prog = s["progress"] or {}
    try:  # the annotation comes from inside the run: a field of the wrong type drops the line, not the command
        if prog.get("step") is not None and prog.get("steps"):
            line = f"{prog.get('stage', 'step')} step {prog['step']:,} / {prog['steps']:,} ({prog['step'] / prog['steps']:.0%})"
            if prog.get("eta_seconds") is not None:
                line += f", ETA {fmt_hours(prog['eta_seconds'] / 3600)}"
            rows.append(("progress", line + (f" (reported {prog['updated']})" if prog.get("updated") else "")))
    except (TypeError, ValueError, ArithmeticError):
        pass
    cost = []
    spend = s.get("spend")
    if spend and s["spent_dollars"] is not None:
        line = f"${s['spent_dollars']:,.2f} spent over {spend['attempts']} attempt(s)"
        if spend["restarts"]:
            line += f" ({spend['restarts']} restart(s)"
            line += f", {fmt_hours(s['lost_hours'])} lost)" if s.get("lost_hours") is not None else ")"
        elif s.get("lost_hours") is not None:
            line += f" ({fmt_hours(s['lost_hours'])} not kept: start-up, redone steps)"
        cost.append(line)
    elif prog.get("cost_dollars") is not None and (s["spent_dollars"] is None
                                                    or prog["cost_dollars"] >= s["spent_dollars"]):
        cost.append(f"${prog['cost_dollars']:,.2f} reported by the run")
    elif s["spent_dollars"] is not None:
        cost.append(f"${s['spent_dollars']:,.2f} so far ({s['gpus']} GPUs x ${s['price_per_gpu_hour']:.2f}/GPU-h "
                    f"x wall clock)")
    if s["estimate_dollars"] is not None:
        cost.append(f"estimate ${s['estimate_dollars']:,.2f}")
    if s["budget_cap_dollars"] is not None:
        cost.append(f"cap ${s['budget_cap_dollars']:,.2f}")
    if cost:
        rows.append(("cost", ", ".join(cost)))
    if s["storage"]:
        rows.append(("storage", s["storage"]))
    if s.get("tracking"):
        from cli.runview import tracking_lines

        rows += [("tracking", line) for line in tracking_lines(s["tracking"])]
    rows = [(k, clean(v)) for k, v in rows]  # cluster text: no terminal escapes (trainer/text.py)
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


def cmd_list(args) -> int:
    from trainer.spend import parse_iso

    from cli.kube.client import connect
    from cli.kube.rayservice import list_services, service_summary
    from cli.kube.runs import GROUP, MANAGED, PLURAL, VERSION, describe, summary

    kube = connect(args)
    if args.all_namespaces:
        res = kube.call(kube.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL, label_selector=MANAGED,
                        what="list runs in all namespaces", verb="list", resource=PLURAL, group=GROUP)
    else:
        res = kube.call(kube.custom.list_namespaced_custom_object, GROUP, VERSION, kube.namespace, PLURAL,
                        label_selector=MANAGED, what=f"list runs in namespace {kube.namespace}", verb="list",
                        resource=PLURAL, group=GROUP)
    import datetime

    now = datetime.datetime.now(datetime.timezone.utc)
    rows = [summary(rj, now) for rj in res.get("items", [])]
    from cli.idle import idle_warnings, list_clusters, parse_duration

    for warning in idle_warnings(list_clusters(kube, args.all_namespaces), res.get("items", []), now,
                                 parse_duration(args.idle_after), describe):
        say(f"warning: {warning}")
    rows += [service_summary(svc) for svc in list_services(kube, args.all_namespaces, MANAGED)]  # llmctl serve
    rows.sort(key=lambda s: s["created"] or "", reverse=True)
    if args.output == "json":
        print(dump_json(rows))
        return 0
    if not rows:
        say(f"no runs in {'any namespace' if args.all_namespaces else 'namespace ' + kube.namespace}; "
             f"start one with `llmctl submit --depth 12 --gpus 8`")
        return 0
    head = (["NAMESPACE"] if args.all_namespaces else []) + ["NAME", "STATE", "DEPTH", "GPUS", "AGE", "ESTIMATE"]
    table = [head]
    for s in rows:
        created = parse_iso(s["created"])
        table.append(([s["namespace"]] if args.all_namespaces else []) + [
            s["name"], s["state"], f"d{s['depth']}" if s["depth"] is not None else "-",
            f"{s['gpus']}x{s['gpu_type']}", _age((now - created).total_seconds()) if created else "-",
            f"${s['estimate_dollars']:,.2f}" if s["estimate_dollars"] is not None else "-"])
    table = [[clean(c) for c in r] for r in table]  # cluster text: no terminal escapes
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table))
    return 0


# ---------------------------------------------------------------------------------------------
# logs and cancel


def cmd_logs(args) -> int:
    from cli.kube.client import connect
    from cli.kube.pods import CONTAINERS
    from cli.kube.runs import describe, get_run

    if args.local or args.storage or args.rank is not None or args.attempt is not None:
        from cli.logview import cmd_logs_shipped  # the run's shipped logs (trainer/logship.py)

        return cmd_logs_shipped(args)
    kube = connect(args)
    selector = f"llmctl.dev/run={args.run},llmctl.dev/role={args.role}"
    pods = kube.call(kube.core.list_namespaced_pod, kube.namespace, label_selector=selector,
                     what=f"find the {args.role} pod of {args.run}", verb="list", resource="pods")
    items = kube.api_client.sanitize_for_serialization(pods).get("items", [])
    if not items:
        rj = get_run(kube, args.run)
        state, detail = describe(rj)
        if state in ("succeeded", "failed", "stopped", "complete"):  # its pods are gone; its logs were shipped
            from cli.logview import print_shipped

            return print_shipped((rj["metadata"].get("annotations") or {}).get("llmctl.dev/storage", ""), args)
        raise CLIError(f"run {args.run} has no {args.role} pod yet ({state}: {detail}); "
                       f"try again later, or `llmctl status {args.run}`")
    # newest first: a retry makes new pods; the newest is the live attempt
    items.sort(key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]), reverse=True)
    pod = items[0]["metadata"]["name"]
    if len(items) > 1:
        say(f"showing {pod}; {len(items) - 1} more {args.role} pod(s): "
             + ", ".join(p["metadata"]["name"] for p in items[1:]))
    _wait_scheduled(kube, items[0], follow=args.follow, run=args.run)
    kw: dict = dict(container=CONTAINERS[args.role], _preload_content=False)
    if args.tail is not None:
        kw["tail_lines"] = args.tail
    if args.follow:
        kw["follow"] = True
        kw["_request_timeout"] = (10, 7 * 86400)  # a followed log may be quiet for hours (eval, checkpoint)
    resp = _open_log(kube, pod, kw, wait=args.follow, run=args.run)
    from urllib3.exceptions import HTTPError as Urllib3Error

    try:
        for chunk in resp.stream(4096, decode_content=True):
            sys.stdout.write(clean(chunk.decode("utf-8", errors="replace"), newlines=True))  # no terminal escapes
            sys.stdout.flush()
    except Urllib3Error as e:
        raise CLIError(f"the log stream of {pod} broke off ({e}); run the command again to resume") from None
    finally:
        resp.release_conn()
    return 0


def _unscheduled_why(pod: dict) -> str | None:
    """None when the pod is bound to a node; else why not, in the scheduler's words (PodScheduled=False)."""
    st = pod.get("status") or {}
    if (pod.get("spec") or {}).get("nodeName") or st.get("containerStatuses") or \
            st.get("phase") in ("Running", "Succeeded", "Failed"):
        return None
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False":
            return clean(f"{c.get('reason') or 'Unschedulable'}: {c.get('message') or 'no reason given yet'}", limit=500)
    return "the scheduler has not placed it yet"


def _wait_scheduled(kube, pod: dict, *, follow: bool, run: str) -> None:
    """A pod not yet on a node has no log (the API server answers 200 with nothing): say so and why, and with
    -f wait (bounded by console.WAIT_SECONDS) until the scheduler binds it, saying each new reason once."""
    name = pod["metadata"]["name"]
    why = _unscheduled_why(pod)
    if why is None:
        return
    if not follow:
        raise CLIError(f"pod {name} is not on a node yet, so it has no log: {why}; `llmctl status {run}` shows "
                       f"the run's state (or -f to wait for it)")
    said: list[str] = []

    def scheduled() -> bool:
        current = kube.api_client.sanitize_for_serialization(kube.call(
            kube.core.read_namespaced_pod, name, kube.namespace, what=f"read pod {name}", verb="get",
            resource="pods", name=name))
        reason = _unscheduled_why(current)
        if reason is None:
            return True
        if reason not in said:
            said.append(reason)
            say(f"waiting for pod {name} to be scheduled ({reason}); up to {console.WAIT_SECONDS:.0f} s")
        return False

    if not wait_until(scheduled):
        raise CLIError(f"pod {name} was not scheduled within {console.WAIT_SECONDS:.0f} s: "
                       f"{said[-1] if said else why}; `llmctl status {run}` and `llmctl doctor` say whether "
                       f"a worker fits any node")


def _open_log(kube, pod: str, kw: dict, *, wait: bool, run: str):
    """The log stream of `pod`. With `wait` (logs -f), a container still waiting to start (the API server's
    400 `container "c" in pod "p" is waiting to start: ContainerCreating`, kubelet_pods.go) is polled, bounded
    by console.WAIT_SECONDS and said once per reason on stderr, instead of failing right after submit."""
    from kubernetes.client.rest import ApiException

    said, result = set(), {}

    def attempt() -> bool:
        try:
            result["resp"] = kube.core.read_namespaced_pod_log(pod, kube.namespace, **kw)
            return True
        except ApiException as e:
            message = _api_message(e)
            if not (wait and e.status == 400 and "is waiting to start" in message):
                raise
            reason = clean(message.rsplit(":", 1)[-1].strip(), limit=80)
            if reason not in said:
                said.add(reason)
                say(f"waiting for pod {pod} to start ({reason}); up to {console.WAIT_SECONDS:.0f} s")
            return False

    try:
        if wait_until(attempt):
            return result["resp"]
    except ApiException:  # not a wait: the usual one-line mapping (permissions, a missing pod, ...)
        return kube.call(kube.core.read_namespaced_pod_log, pod, kube.namespace, what=f"read the log of {pod}",
                         verb="get", resource="pods/log", name=pod, **kw)
    raise CLIError(f"pod {pod} did not start within {console.WAIT_SECONDS:.0f} s; `llmctl status {run}` "
                   f"shows why (kubectl describe pod {pod} -n {kube.namespace} for its events)")


def _api_message(e) -> str:
    try:
        return str(json.loads(e.body or "{}").get("message") or "")
    except (TypeError, ValueError, AttributeError):
        return ""


def cmd_cancel(args) -> int:
    from cli.kube.client import connect
    from cli.kube.runs import GROUP, PLURAL, VERSION, get_run

    require_yes(args, "cancel")
    kube = connect(args)
    rj = get_run(kube, args.run)
    labels = rj.get("metadata", {}).get("labels") or {}
    if labels.get("app.kubernetes.io/managed-by") != "llmctl":
        raise CLIError(f"RayJob {args.run} was not created by llmctl; delete it with kubectl if you mean to")
    storage = (rj.get("metadata", {}).get("annotations") or {}).get("llmctl.dev/storage", "its storage")
    if not args.yes and not confirm(f"Cancel {args.run} in namespace {kube.namespace}? Its Ray cluster is "
                                     f"deleted; checkpoints stay under {storage}."):
        say("not cancelled")
        return 1
    kube.call(kube.custom.delete_namespaced_custom_object, GROUP, VERSION, kube.namespace, PLURAL, args.run,
              propagation_policy="Background", what=f"delete run {args.run}", verb="delete", resource=PLURAL,
              name=args.run, group=GROUP)
    print(f"rayjob.ray.io/{args.run} deleted in namespace {kube.namespace}")
    say(f"its Ray cluster and pods go with it; checkpoints stay under {storage}: submitting the same command "
         f"again resumes from the last one")
    return 0


# ---------------------------------------------------------------------------------------------
# Parsers


def register(sub) -> None:
    p = sub.add_parser("status", help="show a run's state, progress and cost so far",
                       description="Show a run's state in plain words, its pods while it starts, its progress "
                       "when the run reports it, and dollars so far against the estimate.",
                       epilog="Example: llmctl status gpt-d26-8xh100-1a2b3c4d -n team")
    p.add_argument("run", help="run name (llmctl list shows them)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    p.add_argument("--no-storage", action="store_true", help="do not read progress.json and spend.json from the "
                   "run's storage (the RayJob's status only)")
    p.add_argument("--local", action="store_true", help="read the run from its storage only, no cluster (a "
                   "`submit --local` run, or any run whose storage you can read)")
    p.add_argument("--storage", help="with --local: storage root where run names are looked up (default "
                   "file://~/.cache/llmctl); a run URL works too")
    add_cluster_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("list", help="list runs and services", description="List llmctl runs (RayJobs it created) "
                       "and served models (RayServices of `llmctl serve`), newest first.",
                       epilog="Example: llmctl list -A")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="list runs in every namespace")
    p.add_argument("--idle-after", default=IDLE_AFTER, metavar="DURATION", help="warn about Ray clusters that ran "
                   f"no job for longer than this, e.g. 30m, 2h (default {IDLE_AFTER})")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    add_cluster_args(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("logs", help="print (or follow) a run's log",
                       description="Print the run's log: by default the driver's output, as relayed by the "
                       "submitter pod (it outlives the Ray cluster); --role head|worker for those pods.",
                       epilog="Example: llmctl logs gpt-d26-8xh100-1a2b3c4d -f")
    p.add_argument("run", help="run name")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the pod ends")
    p.add_argument("--tail", type=int, help="only the last N lines")
    p.add_argument("--role", choices=("submitter", "head", "worker"), default="submitter", help="which pod")
    p.add_argument("--rank", type=int, metavar="N", help="the shipped log of Ray Train rank N, read from the run's "
                   "storage (works after the cluster is gone)")
    p.add_argument("--attempt", type=int, metavar="K", help="the shipped log of attempt K (1 = first; default the "
                   "newest); without --rank, the driver's")
    p.add_argument("--local", action="store_true", help="read shipped logs from storage only, no cluster")
    p.add_argument("--storage", help="storage root (or run URL) holding the run; implies reading shipped logs")
    add_cluster_args(p)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="stop a run and free its GPUs (checkpoints are kept)",
                       description="Delete the run's RayJob, and with it the Ray cluster and pods. Checkpoints in "
                       "storage stay: submitting the same command again resumes.",
                       epilog="Example: llmctl cancel gpt-d26-8xh100-1a2b3c4d --yes")
    p.add_argument("run", help="run name")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask (required off a terminal)")
    add_cluster_args(p)
    p.set_defaults(func=cmd_cancel)
