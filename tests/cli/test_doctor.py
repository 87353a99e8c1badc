"""cli/doctor.py against the strict stand-in (tests/kube_fake.py) with the chart's own objects and RBAC: the pass
path on every supported KubeRay and Kueue release, and each fail path with its fix; -o json; bad flags.

Run: .venv/bin/pytest tests/cli/test_doctor.py -v
"""

from __future__ import annotations

import json
import subprocess

import pytest

from cli.main import main
from tests import schemas
from tests.kube_fake import FakeKube
from tests.test_chart import CHART
from tests.tools import ensure_helm

H100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def chart(*args: str, kueue: str | None = None) -> list[dict]:
    api = []
    if kueue:
        api = [a for v in schemas.served_versions("kueue.x-k8s.io", "LocalQueue", kueue)
               for a in ("--api-versions", f"kueue.x-k8s.io/{v}")]
    out = subprocess.run([str(ensure_helm()), "template", "llmctl", str(CHART), "-n", "team",
                          "--set", "rbac.subjects[0].kind=User", "--set", "rbac.subjects[0].name=ada",
                          "--set", "rbac.clusterScope=true", *api, *args],
                         capture_output=True, text=True, check=True).stdout
    return schemas.load_yaml_stream(out)


def node(name: str, labels: dict, allocatable: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels},
            # an 8-GPU node's room for a whole default worker pod (doctor checks the pod fits; real node sizes are
            # tests/controlplane/nodes.py's, used by tests/cli/test_real_cluster.py)
            "status": {"allocatable": {"cpu": "208", "memory": "1800Gi", "ephemeral-storage": "5000Gi",
                                       **allocatable}}}


def setup(kube: FakeKube, docs: list[dict], *, nodes=True, configmap=True, queue_objects=True) -> str:
    kube.load_rbac(docs)
    for d in docs:
        if (d["kind"] == "ConfigMap" and d["metadata"]["name"] == "llmctl-config" and configmap) or \
                (d["kind"] == "LocalQueue" and queue_objects):
            kube.add(d)
    if nodes:
        for i in range(2):
            kube.add(node(f"gpu-{i}", H100, {"nvidia.com/gpu": "8"}))
        kube.add(node("cpu-0", {}, {}))
    return kube.user_token("ada")


def doctor(kube, tmp_path, monkeypatch, capsys, token, *argv) -> tuple[int, str, str]:
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path / "kc", token=token)))
    rc = main(["doctor", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def lines(out: str) -> dict[str, str]:
    """check name -> its whole line."""
    return {line.split()[1]: line for line in out.splitlines() if line[:1] in "✓!✗"}


@pytest.mark.parametrize("kuberay", schemas.KUBERAY_RELEASES)
@pytest.mark.parametrize("kueue", [None, *schemas.KUEUE_RELEASES])
def test_a_ready_cluster_passes_on_every_supported_release(kuberay, kueue, tmp_path, monkeypatch, capsys):
    docs = chart(*(["--set", "kueue.localQueue.create=true"] if kueue else []), kueue=kueue)
    with FakeKube(kuberay=kuberay, kueue=kueue) as kube:
        ada = setup(kube, docs)
        rc, out, err = doctor(kube, tmp_path, monkeypatch, capsys, ada)
        assert rc == 0, out + err
        got = lines(out)
        assert set(got) == {"api", "namespace", "config", "kuberay", "kueue", "permissions", "run", "gpu", "image"}
        assert "as ada" in got["api"] and got["api"].startswith("✓")
        assert f"KubeRay {'.'.join(kuberay.split('.')[:2])}" in got["kuberay"] and got["kuberay"].startswith("✓")
        if kueue:
            assert "LocalQueue h100 exists" in got["kueue"] and got["kueue"].startswith("✓")
            expected = {"0.13.4": "0.13-0.14", "0.14.2": "0.13-0.14", "0.15.0": "0.15", "0.19.2": ">=0.16"}[kueue]
            assert f"Kueue {expected} serves" in got["kueue"]
        assert got["gpu"].startswith("✓") and "h100: 2 node(s) nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3, 8 GPUs" \
            in got["gpu"]
        assert got["run"].startswith("!")  # asking about another subject needs more than the chart grants
        assert "a submit would work" in err
        # and the request log shows reads and reviews only
        assert {r.method for r in kube.requests} <= {"GET", "POST"}
        assert all(r.path.endswith(("reviews", "subjectaccessreviews")) for r in kube.requests if r.method == "POST")


def test_json_output_for_scripts(tmp_path, monkeypatch, capsys):
    with FakeKube() as kube:
        ada = setup(kube, chart())
        rc, out, _ = doctor(kube, tmp_path, monkeypatch, capsys, ada, "-o", "json")
        report = json.loads(out)
        assert rc == 0 and report["ok"] is True
        assert [c["name"] for c in report["checks"]][:3] == ["api", "namespace", "config"]
        assert {c["status"] for c in report["checks"]} <= {"ok", "warn"}


def _fail(kube, tmp_path, monkeypatch, capsys, token, name: str, *argv) -> str:
    rc, out, err = doctor(kube, tmp_path, monkeypatch, capsys, token, *argv)
    assert rc == 1, out + err
    line = lines(out)[name]
    assert line.startswith("✗") and " — fix: " in line, line
    assert "a submit would fail" in err
    return line


def test_kuberay_missing(tmp_path, monkeypatch, capsys):
    with FakeKube(crds=False) as kube:
        ada = setup(kube, chart())
        line = _fail(kube, tmp_path, monkeypatch, capsys, ada, "kuberay")
        assert "KubeRay is not installed" in line and "helm install kuberay-operator" in line


def test_kuberay_release_unknown_without_crd_access_is_a_caveat_and_the_config_value_settles_it(
        tmp_path, monkeypatch, capsys):
    docs = [d for d in chart() if d["kind"] not in ("ClusterRole", "ClusterRoleBinding")]
    with FakeKube(kuberay="1.5.2") as kube:
        ada = setup(kube, docs)
        rc, out, _ = doctor(kube, tmp_path, monkeypatch, capsys, ada)
        got = lines(out)
        assert got["kuberay"].startswith("!") and "release unknown" in got["kuberay"]
        assert got["gpu"].startswith("!") and "needs list on nodes at cluster scope" in got["gpu"]
        assert rc == 0  # a submit would still work (rendered for 1.3)
    with FakeKube(kuberay="1.5.2") as kube:
        ada = setup(kube, chart("--set", "config.kuberay.version=1.5"))
        kube.load_rbac(docs)
        rc, out, _ = doctor(kube, tmp_path, monkeypatch, capsys, ada)
        assert lines(out)["kuberay"].startswith("✓") and "KubeRay 1.5 per kuberay.version" in lines(out)["kuberay"]


def test_no_configmap(tmp_path, monkeypatch, capsys):
    with FakeKube() as kube:
        ada = setup(kube, chart(), configmap=False)
        assert "helm install llmctl charts/llmctl -n team" in _fail(kube, tmp_path, monkeypatch, capsys, ada, "config")


def test_invalid_configmap(tmp_path, monkeypatch, capsys):
    with FakeKube() as kube:
        ada = setup(kube, chart(), configmap=False)
        kube.add({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "llmctl-config"},
                  "data": {"config.yaml": "workers: {gpusPerNode: 0}\n"}})
        assert "workers.gpusPerNode" in _fail(kube, tmp_path, monkeypatch, capsys, ada, "config")


def test_queue_without_kueue_and_without_its_localqueue(tmp_path, monkeypatch, capsys):
    docs = chart("--set", "kueue.localQueue.create=true", kueue="0.19.2")
    with FakeKube() as kube:  # no Kueue
        ada = setup(kube, docs, queue_objects=False)
        assert "Kueue is not installed" in _fail(kube, tmp_path, monkeypatch, capsys, ada, "kueue")
    with FakeKube(kueue="0.13.4") as kube:
        ada = setup(kube, docs, queue_objects=False)
        line = _fail(kube, tmp_path, monkeypatch, capsys, ada, "kueue")
        assert "Kueue 0.13-0.14 serves v1beta1, but LocalQueue h100 does not exist" in line
        assert "kueue.localQueue.create=true" in line


def test_missing_permissions_are_named(tmp_path, monkeypatch, capsys):
    with FakeKube() as kube:
        setup(kube, chart())
        bob = kube.user_token("bob")  # not in rbac.subjects
        line = _fail(kube, tmp_path, monkeypatch, capsys, bob, "permissions")
        assert "create on rayjobs.ray.io in namespace team" in line and "get on pods/log in namespace team" in line
        assert "rbac.subjects[0].name=<you>" in line


def test_gpu_nodes_missing_or_without_devices_or_extra_resources(tmp_path, monkeypatch, capsys):
    with FakeKube() as kube:
        ada = setup(kube, chart(), nodes=False)
        kube.add(node("gke-0", {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}, {"nvidia.com/gpu": "8"}))
        line = _fail(kube, tmp_path, monkeypatch, capsys, ada, "gpu")
        assert "no node carries a configured GPU selector (labels nvidia.com/gpu.product)" in line and "gke" in line
    with FakeKube() as kube:  # the GKE choice finds them
        ada = setup(kube, chart("--set", "config.workers.gpuLabels=gke"), nodes=False)
        kube.add(node("gke-0", {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}, {"nvidia.com/gpu": "8"}))
        rc, out, _ = doctor(kube, tmp_path, monkeypatch, capsys, ada)
        assert rc == 0 and lines(out)["gpu"].startswith("✓")
    with FakeKube() as kube:
        ada = setup(kube, chart(), nodes=False)
        kube.add(node("gpu-0", H100, {}))
        assert "none has allocatable nvidia.com/gpu" in _fail(kube, tmp_path, monkeypatch, capsys, ada, "gpu")
    with FakeKube() as kube:
        ada = setup(kube, chart("--set", "config.workers.extraResources.vpc\\.amazonaws\\.com/efa=32"))
        line = _fail(kube, tmp_path, monkeypatch, capsys, ada, "gpu")
        assert "runs request vpc.amazonaws.com/efa 32 but no h100 node advertises it" in line


def test_unpinned_image_is_a_caveat_and_a_bad_one_fails(tmp_path, monkeypatch, capsys):
    with FakeKube() as kube:
        ada = setup(kube, chart("--set", "image.tag=latest"))
        rc, out, _ = doctor(kube, tmp_path, monkeypatch, capsys, ada)
        assert rc == 0 and lines(out)["image"].startswith("!") and "not pinned" in lines(out)["image"]
    with FakeKube() as kube:
        ada = setup(kube, chart(), configmap=False)
        bad = tmp_path / "cfg.yaml"
        bad.write_text("image: 'Not An Image'\n")
        rc, out, err = doctor(kube, tmp_path, monkeypatch, capsys, ada, "--cluster-config", str(bad))
        assert rc == 1 and "cluster config image: must be an image reference" in lines(out)["config"]


def test_missing_namespace(tmp_path, monkeypatch, capsys):
    with FakeKube() as kube:  # no RBAC: namespaces are readable
        line = _fail(kube, tmp_path, monkeypatch, capsys, kube.token, "namespace", "-n", "nope")
        assert "namespace nope does not exist" in line


def test_unreachable_and_unauthorized_stop_at_the_api_line(tmp_path, monkeypatch, capsys):
    with FakeKube() as kube:
        setup(kube, chart())
        line = _fail(kube, tmp_path, monkeypatch, capsys, "stale-token", "api")
        assert "rejected your credentials (401)" in line
        url = kube.url
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kc"))  # the server is gone now
    rc = main(["doctor"])
    out, _ = capsys.readouterr()
    assert rc == 1 and list(lines(out)) == ["api"] and "cannot reach the Kubernetes API" in out and url


@pytest.mark.parametrize("argv", [["--bogus"], ["-o", "yaml"]])
def test_bad_flags_are_one_line_and_exit_2(argv, capsys):
    assert main(["doctor", *argv]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("llmctl: error:") and err.count("\n") == 1


def test_deps_node_quantities_compare_as_kubernetes_quantities(tmp_path, monkeypatch, capsys):
    """Allocatable quantities were once compared as text ("9" ranked above "10") and int() failed on
    "1k"; kubernetes.utils.parse_quantity compares them as numbers."""
    with FakeKube() as kube:
        ada = setup(kube, chart("--set", "config.workers.extraResources.rdma/ib=10"), nodes=False)
        kube.add(node("gpu-0", H100, {"nvidia.com/gpu": "8", "rdma/ib": "9"}))
        kube.add(node("gpu-1", H100, {"nvidia.com/gpu": "8", "rdma/ib": "1k"}))
        rc, out, _ = doctor(kube, tmp_path, monkeypatch, capsys, ada)
        assert rc == 0 and lines(out)["gpu"].startswith("✓") and "8 GPUs allocatable, rdma/ib 1000" in lines(out)["gpu"]
    with FakeKube() as kube:
        ada = setup(kube, chart("--set", "config.workers.extraResources.rdma/ib=10"), nodes=False)
        kube.add(node("gpu-0", H100, {"nvidia.com/gpu": "8", "rdma/ib": "9"}))
        line = _fail(kube, tmp_path, monkeypatch, capsys, ada, "gpu")
        assert "runs request rdma/ib 10 per worker pod but h100 nodes advertise at most 9" in line
    with FakeKube() as kube:  # a GPU count Kubernetes writes with a suffix still counts
        ada = setup(kube, chart(), nodes=False)
        kube.add(node("gpu-0", H100, {"nvidia.com/gpu": "1k"}))
        rc, out, _ = doctor(kube, tmp_path, monkeypatch, capsys, ada)
        assert rc == 0 and "1000 GPUs allocatable" in lines(out)["gpu"]


# ---------------------------------------------------------------- hostile input
# (shared helpers: tests/hostile.py)

def test_hostile_doctor_checks_the_pod_security_label(tmp_path, monkeypatch, capsys):
    from tests.kube_fake import FakeKube

    with FakeKube() as kube:
        monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path / "kc", token=kube.token)))
        main(["doctor"])
        line = next(ln for ln in capsys.readouterr().out.splitlines() if ln[2:].startswith("namespace"))
        assert line.startswith("!") and "kubectl label namespace team pod-security.kubernetes.io/enforce=restricted" \
            in line, line
        kube.namespace_labels["team"] = {"pod-security.kubernetes.io/enforce": "restricted"}
        main(["doctor"])
        line = next(ln for ln in capsys.readouterr().out.splitlines() if ln[2:].startswith("namespace"))
        assert line.startswith("✓") and "restricted enforced" in line, line
