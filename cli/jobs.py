"""`llmctl status | list | logs | cancel`: the runs on Kubernetes (KubeRay RayJobs that `llmctl submit`,
cli/submit.py, created), in plain words.

A thin layer over the kubernetes client: each command parses, makes a few API calls and prints. Results go
to stdout; warnings and next steps go to stderr, so `-o json` output stays parseable. Also here, shared with
cli/submit.py: the RayJob API coordinates and asking before an action (`require_yes`, `confirm`).
"""

from __future__ import annotations

import datetime
import json
import sys

from cli.cluster import add_cluster_args, connect
from cli.errors import CLIError, UsageError
from cli.plan import fmt_hours
from trainer.plan.pricing import dollars
from cli.safe import clean, dump_json

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
MANAGED = "app.kubernetes.io/managed-by=llmctl"
IDLE_AFTER = "2h"  # `list --idle-after`'s default (cli/idle.py); the same window as the LlmctlRayClusterIdle alert
POLL_SECONDS = 2.0  # between polls of a pending pod's log or a RayJob being deleted (tests set 0)
WAIT_SECONDS = 300.0  # the most `logs -f` waits for a pod to start, or submit for a deleted run to go


def say(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def interactive() -> bool:
    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def confirm(question: str) -> bool:
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def require_yes(args, action: str) -> None:
    """Never prompt off a terminal: without --yes there, refuse before touching the cluster."""
    if not args.yes and not interactive():
        raise UsageError(f"{action}: stdin is not a terminal, so nobody can confirm; pass --yes")


def wait_until(done, *, timeout: float = None, interval: float = None) -> bool:
    """Poll `done()` until it returns true or `timeout` seconds pass (bounded waits, never forever)."""
    import time

    timeout = WAIT_SECONDS if timeout is None else timeout
    interval = POLL_SECONDS if interval is None else interval
    deadline = time.monotonic() + timeout
    while True:
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def get_run(kube, name: str) -> dict:
    """GET the RayJob `name`; a plain 404 whose namespace does not exist says so (a real server answers
    `rayjobs.ray.io "x" not found` for both cases, so the namespace is asked for separately)."""
    try:
        return kube.call(kube.custom.get_namespaced_custom_object, GROUP, VERSION, kube.namespace, PLURAL, name,
                         what=f"get run {name}", verb="get", resource=PLURAL, name=name, group=GROUP)
    except CLIError as e:
        if f"no rayjob {name!r}" in str(e):
            check_namespace(kube)
        raise


def check_namespace(kube) -> None:
    """Raise a CLIError when the namespace does not exist (GET /api/v1/namespaces/<ns> answers 404
    `namespaces "x" not found`); anything else (403: the user may not read namespaces) says nothing."""
    from kubernetes.client.rest import ApiException

    try:
        kube.core.read_namespace(kube.namespace, _request_timeout=(10, 30))
    except ApiException as e:
        if e.status == 404:
            raise CLIError(f"namespace {kube.namespace} does not exist; check -n and the kubeconfig context's "
                           f"namespace (kubectl get namespaces)") from None
    except Exception:  # noqa: BLE001 - only a hint; the caller's own error stands
        return


# ---------------------------------------------------------------------------------------------
# status and list: RayJob status in plain words

FAILURE_REASONS = {
    "DeadlineExceeded": "ran past its deadline (activeDeadlineSeconds, from the estimate with a margin)",
    "PreRunningDeadlineExceeded": "its pods did not start in time (no free GPUs, a node selector no node "
                                  "matches, or a slow image pull; see the pod events)",
    "AppFailed": "the training program exited with an error (see llmctl logs)",
    "SubmissionFailed": "the job could not be submitted to the Ray cluster (see llmctl logs)",
    "JobStatusCheckTimeoutExceeded": "the Ray head stopped answering (head pod lost?)",
    "JobDeploymentStatusTransitionGracePeriodExceeded": "the Ray job ended but the cluster did not settle",
    "ValidationFailed": "KubeRay rejected the spec",
}


def describe(rj: dict) -> tuple[str, str]:
    """(state, detail): the state is one of submitted, queued, starting, running, retrying, succeeded,
    stopped, failed; the detail says why, in words (RayJob jobDeploymentStatus / jobStatus / reason)."""
    st = rj.get("status") or {}
    spec = rj.get("spec") or {}
    dep, job, reason = st.get("jobDeploymentStatus") or "", st.get("jobStatus") or "", st.get("reason") or ""
    message = (st.get("message") or "").strip()
    queue = (rj.get("metadata", {}).get("labels") or {}).get("kueue.x-k8s.io/queue-name")
    if dep in ("", "New"):
        if spec.get("suspend") and queue:
            return "queued", f"waiting for Kueue to admit it from queue {queue}"
        return "submitted", "waiting for the KubeRay operator to pick it up (is it running?)"
    if dep in ("Suspended", "Suspending"):
        return "queued", (f"waiting for Kueue to admit it from queue {queue}" if queue else "suspended")
    if dep == "Initializing":
        return "starting", "creating the Ray cluster (pods scheduling, image pulling)"
    if dep == "Waiting":
        return "starting", "waiting for a job to be submitted (interactive mode)"
    if dep == "Retrying":
        failed = st.get("failed") or 0
        return "retrying", (f"attempt {failed} of {1 + (spec.get('backoffLimit') or 0)} failed; a new Ray "
                            f"cluster resumes from the last checkpoint")
    if dep == "Running":
        if job == "RUNNING":
            return "running", f"training on Ray cluster {st.get('rayClusterName', '?')}"
        return "starting", f"Ray cluster up, Ray job {job or 'not yet submitted'}"
    if dep == "Complete":
        if job == "SUCCEEDED":
            return "succeeded", "all stages finished"
        if job == "STOPPED":
            return "stopped", "the Ray job was stopped"
        return "failed", FAILURE_REASONS.get(reason, f"Ray job {job or 'ended'}") + (f": {message}" if message else "")
    if dep in ("Failed", "ValidationFailed"):
        why = FAILURE_REASONS.get(reason or dep, reason or "failed")
        return "failed", why + (f": {message}" if message else "")
    return dep.lower(), message or f"jobDeploymentStatus {dep}"


def _parse_time(ts: str | None) -> datetime.datetime | None:
    if not ts:
        return None
    try:  # RFC 3339 as the API server writes it ("2026-01-01T00:00:00Z", maybe with fractions)
        t = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=datetime.timezone.utc)


def _age(seconds: float) -> str:
    for unit, div in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= div:
            return f"{seconds / div:.0f}{unit}" if unit != "h" else f"{seconds / 3600:.1f}h"
    return f"{seconds:.0f}s"


def summary(rj: dict, now: datetime.datetime | None = None) -> dict:
    """The status of one run as a flat dict (what `status -o json` prints and the table shows)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    meta, st = rj.get("metadata") or {}, rj.get("status") or {}
    labels, ann = meta.get("labels") or {}, meta.get("annotations") or {}
    state, detail = describe(rj)

    def num(key: str) -> float | None:
        try:
            return float(ann[key])
        except (KeyError, ValueError):
            return None

    gpus = int(labels.get("llmctl.dev/gpus", "0") or 0)
    price = num("llmctl.dev/price-per-gpu-hour")
    start, end = _parse_time(st.get("startTime")), _parse_time(st.get("endTime"))
    elapsed = ((end or now) - start).total_seconds() if start else None
    out = {
        "name": meta.get("name"), "namespace": meta.get("namespace"), "state": state, "detail": detail,
        "depth": int(labels["llmctl.dev/depth"]) if "llmctl.dev/depth" in labels else None,
        "gpus": gpus, "gpu_type": labels.get("llmctl.dev/gpu-type"),
        "created": meta.get("creationTimestamp"), "started": st.get("startTime"), "ended": st.get("endTime"),
        "elapsed_hours": None if elapsed is None else elapsed / 3600,
        "estimate_hours": num("llmctl.dev/estimate-hours"), "estimate_dollars": num("llmctl.dev/estimate-dollars"),
        "budget_cap_dollars": num("llmctl.dev/budget-cap-dollars"), "price_per_gpu_hour": price,
        # GPU time paid so far at the plan's price: wall clock since the cluster started x GPUs x price
        "spent_dollars": None if elapsed is None or price is None else dollars(elapsed / 3600, gpus, price),
        "storage": ann.get("llmctl.dev/storage"), "progress": None,
    }
    return out


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
    if args.local:  # a run's storage alone, no cluster (cli/runview.py)
        from cli.runview import cmd_status_local

        return cmd_status_local(args)
    kube = connect(args)
    try:
        rj = get_run(kube, args.run)
    except CLIError as e:  # not a run: maybe a service (llmctl serve)
        from cli.rayservice import get_service, service_status_lines, service_summary

        svc = get_service(kube, args.run) if f"no rayjob {args.run!r}" in str(e) else None
        if svc is None:
            raise
        s = service_summary(svc)
        print(dump_json(s) if args.output == "json" else clean(service_status_lines(s)))
        return 0
    s = summary(rj)
    if not args.no_storage:
        from cli.runview import add_storage_view

        add_storage_view(s)
        if s.get("storage_error"):
            say(clean(f"warning: could not read progress and spend from {s['storage']}: {s['storage_error']} "
                      f"(--no-storage skips it)"))  # the storage URL is the RayJob's annotation: untrusted
    if s["state"] in ("submitted", "queued", "starting", "running", "retrying"):
        pods = kube.call(kube.core.list_namespaced_pod, kube.namespace, label_selector=f"llmctl.dev/run={args.run}",
                         what=f"list the pods of {args.run}", verb="list", resource="pods")
        s["pods"] = _pods_line(kube.api_client.sanitize_for_serialization(pods).get("items", []))
    if args.output == "json":
        print(dump_json(s))
        return 0
    rows = [("run", f"{s['name']} (namespace {s['namespace']})"), ("state", f"{s['state']}: {s['detail']}")]
    if s["depth"] is not None:
        rows.append(("model", f"d{s['depth']} on {s['gpus']} x {s['gpu_type']}"))
    if s.get("pods"):
        rows.append(("pods", s["pods"]))
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
    rows = [(k, clean(v, newlines=False)) for k, v in rows]  # cluster text: no terminal escapes (cli/safe.py)
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


def cmd_list(args) -> int:
    kube = connect(args)
    if args.all_namespaces:
        res = kube.call(kube.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL, label_selector=MANAGED,
                        what="list runs in all namespaces", verb="list", resource=PLURAL, group=GROUP)
    else:
        res = kube.call(kube.custom.list_namespaced_custom_object, GROUP, VERSION, kube.namespace, PLURAL,
                        label_selector=MANAGED, what=f"list runs in namespace {kube.namespace}", verb="list",
                        resource=PLURAL, group=GROUP)
    now = datetime.datetime.now(datetime.timezone.utc)
    from cli.rayservice import list_services, service_summary

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
        created = _parse_time(s["created"])
        table.append(([s["namespace"]] if args.all_namespaces else []) + [
            s["name"], s["state"], f"d{s['depth']}" if s["depth"] is not None else "-",
            f"{s['gpus']}x{s['gpu_type']}", _age((now - created).total_seconds()) if created else "-",
            f"${s['estimate_dollars']:,.2f}" if s["estimate_dollars"] is not None else "-"])
    table = [[clean(c, newlines=False) for c in r] for r in table]  # cluster text: no terminal escapes
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    print("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table))
    return 0


# ---------------------------------------------------------------------------------------------
# logs and cancel


def cmd_logs(args) -> int:
    from cli.rayjob import CONTAINERS

    kube = connect(args)
    selector = f"llmctl.dev/run={args.run},llmctl.dev/role={args.role}"
    pods = kube.call(kube.core.list_namespaced_pod, kube.namespace, label_selector=selector,
                     what=f"find the {args.role} pod of {args.run}", verb="list", resource="pods")
    items = kube.api_client.sanitize_for_serialization(pods).get("items", [])
    if not items:
        rj = get_run(kube, args.run)
        state, detail = describe(rj)
        raise CLIError(f"run {args.run} has no {args.role} pod yet ({state}: {detail}); "
                       f"try again later, or `llmctl status {args.run}`")
    # newest first: a retry makes new pods; the newest is the live attempt
    items.sort(key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]), reverse=True)
    pod = items[0]["metadata"]["name"]
    if len(items) > 1:
        say(f"showing {pod}; {len(items) - 1} more {args.role} pod(s): "
             + ", ".join(p["metadata"]["name"] for p in items[1:]))
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
            sys.stdout.write(clean(chunk.decode("utf-8", errors="replace")))  # no terminal escapes
            sys.stdout.flush()
    except Urllib3Error as e:
        raise CLIError(f"the log stream of {pod} broke off ({e}); run the command again to resume") from None
    finally:
        resp.release_conn()
    return 0


def _open_log(kube, pod: str, kw: dict, *, wait: bool, run: str):
    """The log stream of `pod`. With `wait` (logs -f), a container still waiting to start (the API server's
    400 `container "c" in pod "p" is waiting to start: ContainerCreating`, kubelet_pods.go) is polled, bounded
    by WAIT_SECONDS and said once per reason on stderr, instead of failing right after submit."""
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
            reason = _clean(message.rsplit(":", 1)[-1].strip(), 80)
            if reason not in said:
                said.add(reason)
                say(f"waiting for pod {pod} to start ({reason}); up to {WAIT_SECONDS:.0f} s")
            return False

    try:
        if wait_until(attempt):
            return result["resp"]
    except ApiException:  # not a wait: the usual one-line mapping (permissions, a missing pod, ...)
        return kube.call(kube.core.read_namespaced_pod_log, pod, kube.namespace, what=f"read the log of {pod}",
                         verb="get", resource="pods/log", name=pod, **kw)
    raise CLIError(f"pod {pod} did not start within {WAIT_SECONDS:.0f} s; `llmctl status {run}` "
                   f"shows why (kubectl describe pod {pod} -n {kube.namespace} for its events)")


def _api_message(e) -> str:
    try:
        return str(json.loads(e.body or "{}").get("message") or "")
    except (TypeError, ValueError, AttributeError):
        return ""


def _clean(text: str, limit: int = 200) -> str:
    """An untrusted string fit for one terminal line: control characters dropped, length bounded."""
    return "".join(c for c in str(text) if c.isprintable())[:limit]


def cmd_cancel(args) -> int:
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
