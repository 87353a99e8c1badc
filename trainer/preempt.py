"""The preemption notice: turn SIGTERM (or the cloud's drain notice) into one last whole checkpoint.

How the notice reaches a Ray Train worker (a Ray actor, `ray::RayTrainWorker`, whose training function runs
in a thread of that actor process):

- Pod termination. The kubelet runs the container's `preStop` hook, then sends SIGTERM to the container's
  PID 1, and SIGKILLs everything when `terminationGracePeriodSeconds` (counted from the start of preStop)
  runs out. PID 1 of a KubeRay Ray container is `bash -lc "...; ray start --block"`, and a bash PID 1 has no
  SIGTERM handler, so the actors never see that SIGTERM. The RayJob's worker and head pods therefore get a
  preStop hook, `python -m trainer.preempt`, which sends SIGTERM to every local `ray::RayTrainWorker`
  process and waits (within the grace period) until each has reported its emergency save done.
- A direct SIGTERM to the worker process (the preStop hook above, `kill`, a local test). Ray's worker main
  loop installs a SIGTERM handler that exits the process; `install()` replaces it with one that only sets a
  flag. Python handlers can only be installed from the main thread, and the training function runs in
  another one, so `install()` runs the installation as a task on the worker actor itself (Ray runs a
  synchronous actor's tasks on its main thread, where Ray's own handler was installed).
- The cloud's notice, where Ray sees it: Ray Train (>= 2.5x) polls Ray Core's node drain state (set by the
  autoscaler or KubeRay when a node is being reclaimed) and marks the worker's preemption context; `pending()`
  reads it without a barrier. A spot VM's metadata notice (AWS's 2-minute instance-action, GCE's
  preempted flag) is not visible to the pod unless a node agent (e.g. aws-node-termination-handler) drains
  the node, which again becomes pod termination above.

The loop checks `pending()` between steps and piggybacks it on its per-step all-reduce (`agree`), so every
rank saves at the same step. The save is an ordinary checkpoint: whole once every rank's upload finished,
invisible otherwise (trainer/checkpoint.py). Then the attempt fails on purpose (`Preempted`) so Ray Train
restarts the worker group from that checkpoint, redoing no step.

The grace period: `grace_seconds(plan)` = one step (the notice can land just after a step began) + the
save (checkpoint bytes / storage bandwidth, the same figure the cost model uses) + a margin for Ray's
registration of the checkpoint; `check_grace` refuses a plan whose save cannot fit the cluster's limit.
"""

from __future__ import annotations

import glob
import math
import os
import signal
import sys
import threading
import time

from trainer.plan.pricing import CHECKPOINT_BANDWIDTH

# Seconds on top of step + save: Ray Train registers the checkpoint (one round trip per rank through its
# sync actor) and the preStop hook polls for the done marker once a second.
GRACE_MARGIN_S = 15
DONE_DIR_ENV = "LLMCTL_PREEMPT_DIR"  # where workers write "saved" markers the preStop hook waits for
WORKER_TITLE = "ray::RayTrainWorker"  # Ray's process title of a Ray Train worker actor


class Preempted(RuntimeError):
    """The attempt ends on purpose after its emergency checkpoint; Ray Train resumes from that checkpoint."""


_flag = threading.Event()
_reason: list[str] = []


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001 - the signal module's signature
    _reason.append("SIGTERM")
    _flag.set()


def _install_here() -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    return os.getpid()


def install() -> None:
    """Replace Ray's exit-on-SIGTERM in this worker process with a flag. Call from the training function."""
    _flag.clear()
    _reason.clear()
    if threading.current_thread() is threading.main_thread():
        _install_here()
        return
    import ray

    try:
        actor = ray.get_runtime_context().current_actor  # this worker; its tasks run on the main thread
        ray.get(actor.execute.remote(_install_here))
    except Exception as e:  # noqa: BLE001 - not a Ray Train worker actor: no notice by signal, train on
        sys.stderr.write(f"llmctl: SIGTERM will not trigger an emergency checkpoint here ({e})\n")


def pending() -> bool:
    """Whether a preemption notice arrived: SIGTERM, or Ray Train's drain notice for this worker group."""
    if _flag.is_set():
        return True
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        info = get_train_context().preemption_context.preemption_info
    except Exception:  # noqa: BLE001 - an internal of Ray Train; a missing attribute means no drain notice
        return False
    if info is not None:
        _reason.append("node drain")
        _flag.set()
    return _flag.is_set()


PEER = "peer rank"  # this rank saw no notice itself; another rank's flag reached it through agree()


def reason() -> str:
    return _reason[0] if _reason else PEER


def mark_done() -> None:
    """Tell the preStop hook on this pod that this worker's emergency checkpoint is in storage."""
    d = os.environ.get(DONE_DIR_ENV, "/tmp/llmctl-preempt")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"done-{os.getpid()}"), "w") as f:
        f.write(str(time.time()))


# -------------------------------------------------------------------- sizing the grace period


def save_seconds(plan) -> float:
    """Estimated seconds to write one whole checkpoint of this plan to storage."""
    from trainer.plan.pricing import checkpoint_bytes

    return checkpoint_bytes(plan.params) / CHECKPOINT_BANDWIDTH


def step_seconds(plan) -> float:
    """Estimated seconds of one optimizer step (the first training stage at the plan's throughput)."""
    st = next((s for s in plan.stages if s.name != "eval"), None)
    return st.hours * 3600 / st.steps if st and st.steps else 0.0


def grace_seconds(plan) -> int:
    """terminationGracePeriodSeconds for the run's pods: finish a step, save, register, with a margin."""
    return int(math.ceil(step_seconds(plan) + save_seconds(plan) + GRACE_MARGIN_S))


def check_grace(plan, limit: int | None) -> int:
    """The grace period the pods need; ValueError (one line) when it exceeds `limit` (the cloud's notice)."""
    need = grace_seconds(plan)
    if limit is not None and need > limit:
        raise ValueError(
            f"lifecycle.maxGraceSeconds: an emergency checkpoint at depth {plan.spec.depth} needs ~{need}s (step "
            f"{step_seconds(plan):.0f}s + save {save_seconds(plan):.0f}s at {CHECKPOINT_BANDWIDTH / 1e6:.0f} MB/s "
            f"+ {GRACE_MARGIN_S}s), over the {limit}s this cluster allows; raise it or use faster storage")
    return need


def prestop_hook(grace: int) -> dict:
    """The Ray containers' lifecycle.preStop: signal the local workers, wait for their saves."""
    return {"exec": {"command": ["python", "-m", "trainer.preempt", "--wait", str(max(1, grace - 2))]}}


def set_preemption(cluster_spec: dict, plan, limit: int | None) -> None:
    """On a RayJob's rayClusterSpec: every Ray pod gets the grace period and the preStop hook."""
    grace = check_grace(plan, limit)
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        pod["terminationGracePeriodSeconds"] = grace
        pod["containers"][0]["lifecycle"] = {"preStop": prestop_hook(grace)}


# -------------------------------------------------------------------- the preStop hook


def worker_pids() -> list[int]:
    """PIDs of the Ray Train worker actors on this machine (by Ray's process title)."""
    pids = []
    for path in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            with open(path, "rb") as f:
                cmd = f.read().split(b"\0", 1)[0].decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(WORKER_TITLE):
            pids.append(int(path.split("/")[2]))
    return sorted(pids)


def notify_and_wait(wait_s: float) -> int:
    """SIGTERM each local worker; wait until each wrote its done marker (or exited), up to `wait_s`."""
    d = os.environ.get(DONE_DIR_ENV, "/tmp/llmctl-preempt")
    pids = worker_pids()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    waiting = set(pids)
    while waiting and time.monotonic() < deadline:
        waiting = {p for p in waiting if os.path.exists(f"/proc/{p}") and not os.path.exists(f"{d}/done-{p}")}
        if waiting:
            time.sleep(1)  # polling a marker file; not synchronisation in a test
    print(f"llmctl preStop: {len(pids) - len(waiting)}/{len(pids)} workers saved", file=sys.stderr)
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(notify_and_wait(float(args[1]) if args[:1] == ["--wait"] else 60.0))
