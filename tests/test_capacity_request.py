"""Capacity requests (charts/llmctl/templates/capacity.yaml, cli/kube/capacity.py): the chart's opt-in
ProvisioningRequest admission check, and on the real control plane (whose fixture installs the cluster
autoscaler's ProvisioningRequest CRD from the module Kueue requires): the check holds a run, suspended,
while `llmctl status` says "waiting for capacity" with Kueue's reason, until the ProvisioningRequest is
Provisioned (set here as the autoscaler would); then Kueue admits the run and it starts.

Run: .venv/bin/pytest tests/test_capacity_request.py -v
"""

from __future__ import annotations

import datetime
import subprocess
import time

import pytest
import yaml

from cli.kube.capacity import waiting_reason
from tests import schemas

WAIT_S = 180


def _render(*args: str, kueue_api: str = "v1beta2") -> list[dict]:
    from tests.test_chart import CHART
    from tests.tools import ensure_helm

    out = subprocess.run([str(ensure_helm()), "template", "r", str(CHART), "-n", "team",
                          "--api-versions", f"kueue.x-k8s.io/{kueue_api}", "--set", "kueue.clusterQueue.create=true",
                          *args], capture_output=True, text=True, check=True).stdout
    return schemas.load_yaml_stream(out)


@pytest.mark.parametrize("api", ["v1beta1", "v1beta2"])
def test_capacity_request_check_is_opt_in_and_wired_to_the_cluster_queue(api):
    off = _render(kueue_api=api)
    assert not [d for d in off if d["kind"] in ("AdmissionCheck", "ProvisioningRequestConfig")]
    (cq,) = [d for d in off if d["kind"] == "ClusterQueue"]
    assert "admissionChecks" not in cq["spec"] and "admissionChecksStrategy" not in cq["spec"]
    on = _render("--set", "kueue.clusterQueue.provisioning.enabled=true", "--set-json",
                 'kueue.clusterQueue.provisioning.parameters={"maxRunDurationSeconds": "86400"}', kueue_api=api)
    (prc,) = [d for d in on if d["kind"] == "ProvisioningRequestConfig"]
    (check,) = [d for d in on if d["kind"] == "AdmissionCheck"]
    (cq,) = [d for d in on if d["kind"] == "ClusterQueue"]
    assert prc["apiVersion"] == check["apiVersion"] == f"kueue.x-k8s.io/{api}"
    assert prc["spec"]["provisioningClassName"] == "queued-provisioning.gke.io"
    assert prc["spec"]["parameters"] == {"maxRunDurationSeconds": "86400"}
    assert prc["spec"]["retryStrategy"] == {"backoffLimitCount": 3, "backoffBaseSeconds": 60, "backoffMaxSeconds": 1800}
    assert check["spec"]["controllerName"] == "kueue.x-k8s.io/provisioning-request"
    assert check["spec"]["parameters"]["name"] == prc["metadata"]["name"]
    if api == "v1beta2":
        assert cq["spec"]["admissionChecksStrategy"]["admissionChecks"] == [
            {"name": check["metadata"]["name"], "onFlavors": ["h100-h100"]}]
    else:
        assert cq["spec"]["admissionChecks"] == [check["metadata"]["name"]]
    schemas.validate(cq, {"kueue": "0.19.2" if api == "v1beta2" else "0.14.2"})


def _wl(conds=(), checks=(), requeue=None):
    return {"status": {"conditions": [dict(zip(("type", "status", "reason", "message"), c)) for c in conds],
                       "admissionChecks": list(checks), **({"requeueState": requeue} if requeue else {})}}


def test_capacity_request_waiting_reasons_in_plain_words():
    assert waiting_reason(_wl([("QuotaReserved", "False", "Pending",
                                "couldn't assign flavors to pod set gpu: insufficient quota for nvidia.com/gpu")])) \
        == "waiting for quota: couldn't assign flavors to pod set gpu: insufficient quota for nvidia.com/gpu"
    assert waiting_reason(_wl([("QuotaReserved", "True", "QuotaReserved", "")],
                              [{"name": "h100-capacity", "state": "Pending",
                                "message": "Waiting for resources. Currently there are not enough resources"}])) \
        == "waiting for capacity: h100-capacity Pending: Waiting for resources. Currently there are not enough resources"
    line = waiting_reason(_wl([("Evicted", "True", "PodsReadyTimeout", "Exceeded the PodsReady timeout ns/wl"),
                               ("QuotaReserved", "False", "Pending", "")], requeue={"count": 2, "requeueAt": "T"}))
    assert line.startswith("requeued: its pods were not ready in time") and "retry 2, next at T" in line
    assert waiting_reason(_wl([("Admitted", "True", "Admitted", "")])) is None


# ---------------------------------------------------------------------------------------------
# On the real control plane


def _get(api, path):
    code, obj = api.get(path)
    return obj if code == 200 else None


def test_capacity_request_holds_a_run_until_provisioned_on_the_real_cluster(real_cluster, tmp_path, capsys):
    from cli.main import main
    from tests.controlplane.cluster import wait_for
    from tests.test_controlplane import _ns

    if not real_cluster.provisioning_requests:
        pytest.skip("the ProvisioningRequest CRD (k8s.io/autoscaler/cluster-autoscaler/apis) is not in the Go "
                    "module cache")
    api = real_cluster.admin()
    ns = _ns(api, "capacity")
    docs = _render("--set", "kueue.clusterQueue.name=cap", "--set", "kueue.clusterQueue.provisioning.enabled=true",
                   "--set", "kueue.clusterQueue.provisioning.className=check-capacity.autoscaling.x-k8s.io")
    plural = {"ResourceFlavor": "resourceflavors", "ClusterQueue": "clusterqueues", "AdmissionCheck": "admissionchecks",
              "ProvisioningRequestConfig": "provisioningrequestconfigs"}
    for d in docs:  # the chart's Kueue objects, judged by the real API server strictly
        if d["kind"] in plural:
            code, out = api.request("POST", f"/apis/kueue.x-k8s.io/v1beta2/{plural[d['kind']]}?fieldValidation=Strict", d)
            assert code == 201, out
    api.create(f"/apis/kueue.x-k8s.io/v1beta2/namespaces/{ns}/localqueues", {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue", "metadata": {"name": "cap"},
        "spec": {"clusterQueue": "cap"}})

    def active():
        cq = _get(api, "/apis/kueue.x-k8s.io/v1beta2/clusterqueues/cap") or {}
        return any(c["type"] == "Active" and c["status"] == "True" for c in (cq.get("status") or {}).get("conditions", []))

    wait_for("ClusterQueue with the capacity check Active", active, time.monotonic() + WAIT_S, real_cluster.procs)

    cfg = tmp_path / "cluster.yaml"
    cfg.write_text(yaml.safe_dump({"storageRoot": "s3://llmctl-runs", "queue": "cap"}))
    kc = real_cluster.kubeconfig("admin", tmp_path / "admin.yaml", namespace=ns)
    argv = ("--kubeconfig", str(kc), "-n", ns)
    assert main(["submit", "--depth", "12", "--gpus", "8", "--yes", "--cluster-config", str(cfg), "--name", "cap-d12",
                 *argv]) == 0
    capsys.readouterr()

    def provisioning_request():
        prs = _get(api, f"/apis/autoscaling.x-k8s.io/v1/namespaces/{ns}/provisioningrequests") or {}
        return (prs.get("items") or [None])[0]

    pr = wait_for("Kueue's ProvisioningRequest for the run", provisioning_request, time.monotonic() + WAIT_S,
                  real_cluster.procs)
    assert pr["spec"]["provisioningClassName"] == "check-capacity.autoscaling.x-k8s.io"
    rj = _get(api, f"/apis/ray.io/v1/namespaces/{ns}/rayjobs/cap-d12")
    assert rj["spec"]["suspend"] is True  # held: quota is reserved, capacity is not

    def status_says_capacity():
        assert main(["status", "cap-d12", "--no-storage", *argv]) == 0
        out = capsys.readouterr().out
        return out if "waiting for capacity: cap-capacity" in out else None

    out = wait_for("status: waiting for capacity", status_says_capacity, time.monotonic() + WAIT_S, real_cluster.procs)
    assert "queued" in out

    # The autoscaler's answer: Provisioned.
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    conds = [{"type": t, "status": "True", "reason": t, "message": f"{t} by the test", "lastTransitionTime": now}
             for t in ("Accepted", "Provisioned")]
    name = pr["metadata"]["name"]
    code, out = api.request("PATCH", f"/apis/autoscaling.x-k8s.io/v1/namespaces/{ns}/provisioningrequests/{name}/status",
                            {"status": {"conditions": conds}}, content_type="application/merge-patch+json")
    assert code == 200, out

    def started():
        j = _get(api, f"/apis/ray.io/v1/namespaces/{ns}/rayjobs/cap-d12") or {}
        return j if not j.get("spec", {}).get("suspend") else None

    wait_for("the run admitted and unsuspended", started, time.monotonic() + WAIT_S, real_cluster.procs)
