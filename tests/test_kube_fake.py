"""tests/kube_fake.py, the strict API-server stand-in: each documented server behaviour it claims, driven through
the real kubernetes client; then llmctl against it on every supported KubeRay release, with RBAC evaluated from
the chart's own rendered Roles and bindings (the CLI user, the head pod's service account).

Run: .venv/bin/pytest tests/test_kube_fake.py -v
"""

from __future__ import annotations

import json
import subprocess

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from cli.kube.config import ClusterConfig
from cli.main import main
from cli.kube.rayjob import build_rayjob
from tests import schemas
from tests.kube_fake import RAYJOB_FINALIZER, FakeKube
from tests.test_chart import CHART
from tests.tools import ensure_helm
from trainer.plan import RunSpec, plan


def api(kube: FakeKube, token: str | None = None) -> client.ApiClient:
    conf = client.Configuration()
    conf.host = kube.url
    conf.api_key = {"authorization": f"Bearer {token or kube.token}"}
    return client.ApiClient(conf)


def rayjob(release: str | None = None, name: str | None = None) -> dict:
    p = plan(RunSpec(depth=12, gpus=8, storage_root="s3://b"))
    rj = build_rayjob(p, ClusterConfig(kuberay_version=release), namespace="team")
    if name:
        rj["metadata"]["name"] = name
    return rj


def created_rayjob(kube) -> tuple:
    """A CustomObjectsApi on the stand-in, and the name of a RayJob it has just created in namespace team."""
    custom = client.CustomObjectsApi(api(kube))
    rj = rayjob()
    custom.create_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", rj)
    return custom, rj["metadata"]["name"]


def body_of(e: ApiException) -> dict:
    return json.loads(e.body)


# ---------------------------------------------------------------------------------------------
# Field validation (AS endpoints/handlers/create.go; CON #field-validation)


@pytest.mark.parametrize("release", schemas.KUBERAY_RELEASES)
def test_strict_create_accepts_what_llmctl_renders_for_each_release(release):
    with FakeKube(kuberay=release) as kube:
        custom = client.CustomObjectsApi(api(kube))
        made = custom.create_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", rayjob(release),
                                                      field_validation="Strict")
        assert made["metadata"]["generation"] == 1 and "status" not in made


def test_the_newest_rendering_on_an_old_operator_is_a_400_under_strict_and_a_silent_prune_by_default():
    """A rendering for a newer KubeRay sent to a 1.5 server, as a real 1.5 server answers."""
    # Without the deletionRules (whose 1.6 jobDeploymentStatus conditions a 1.5 server prunes, and then finds
    # jobStatus missing: a 422, not a silent loss): the point here is the deadline.
    newest = rayjob()
    newest["spec"].pop("deletionStrategy")
    with FakeKube(kuberay="1.5.2") as kube:
        custom = client.CustomObjectsApi(api(kube))
        with pytest.raises(ApiException) as e:
            custom.create_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", newest,
                                                   field_validation="Strict")
        assert e.value.status == 400
        assert body_of(e.value)["message"] == ('RayJob in version "v1" cannot be handled as a RayJob: strict decoding '
                                               'error: unknown field "spec.preRunningDeadlineSeconds"')
        assert kube.get("rayjobs", "team", rayjob()["metadata"]["name"]) is None
        made = custom.create_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", newest)  # Warn
        assert "preRunningDeadlineSeconds" not in made["spec"]  # pruned: the deadline silently gone
        assert kube.warnings == ['unknown field "spec.preRunningDeadlineSeconds"']


def test_schema_violations_are_422_invalid():
    with FakeKube() as kube:
        bad = rayjob()
        bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
        with pytest.raises(ApiException) as e:
            client.CustomObjectsApi(api(kube)).create_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", bad)
        assert e.value.status == 422 and "is invalid: spec.rayClusterSpec.workerGroupSpecs.0.replicas" in \
            body_of(e.value)["message"]


# ---------------------------------------------------------------------------------------------
# Lifecycle: 404 namespace, 409, finalizers, dryRun


def test_create_in_a_missing_namespace_is_404_namespace_not_found_but_get_and_list_are_not():
    with FakeKube() as kube:
        custom = client.CustomObjectsApi(api(kube))
        with pytest.raises(ApiException) as e:
            custom.create_namespaced_custom_object("ray.io", "v1", "nope", "rayjobs", rayjob())
        assert e.value.status == 404 and body_of(e.value)["message"] == 'namespaces "nope" not found'
        with pytest.raises(ApiException) as e:
            custom.get_namespaced_custom_object("ray.io", "v1", "nope", "rayjobs", "x")
        assert body_of(e.value)["message"] == 'rayjobs.ray.io "x" not found'
        assert custom.list_namespaced_custom_object("ray.io", "v1", "nope", "rayjobs")["items"] == []


def test_delete_keeps_a_rayjob_with_kuberays_finalizer_until_the_operator_lets_go():
    with FakeKube() as kube:
        custom, name = created_rayjob(kube)
        rj = rayjob()  # the same RayJob again (the plan, and so the name, is deterministic)
        assert rj["metadata"]["name"] == name
        stored = custom.get_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", name)
        assert stored["metadata"]["finalizers"] == [RAYJOB_FINALIZER]
        gone = custom.delete_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", name)
        assert gone["metadata"]["deletionTimestamp"] and gone["metadata"]["generation"] == 2
        with pytest.raises(ApiException) as e:
            custom.create_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", rj)
        assert e.value.status == 409
        assert body_of(e.value)["message"] == f'object is being deleted: rayjobs.ray.io "{name}" already exists'
        assert kube.reconcile() == [name]
        custom.create_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", rj)
        with pytest.raises(ApiException) as e:
            custom.create_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", rj)
        assert e.value.status == 409 and body_of(e.value)["message"] == f'rayjobs.ray.io "{name}" already exists'


def test_the_operators_scripted_progress_moves_one_status_per_read_and_keeps_the_last():
    with FakeKube() as kube:
        custom = client.CustomObjectsApi(api(kube))
        custom.create_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", rayjob(name="r"))
        kube.status_script[("rayjobs", "team", "r")] = [{"jobDeploymentStatus": "Running"},
                                                        {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}]
        seen = [custom.get_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", "r")["status"]
                ["jobDeploymentStatus"] for _ in range(3)]
        assert seen == ["Running", "Complete", "Complete"]


def test_dry_run_all_judges_everything_and_stores_nothing():
    with FakeKube(kuberay="1.5.2") as kube:
        custom = client.CustomObjectsApi(api(kube))
        made = custom.create_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", rayjob("1.5"), dry_run="All",
                                                      field_validation="Strict")
        assert made["metadata"]["name"] and kube.objects == {}
        with pytest.raises(ApiException) as e:
            custom.create_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", rayjob(), dry_run="All",
                                                   field_validation="Strict")
        assert e.value.status == 400 and kube.objects == {}


def test_logs_of_a_container_waiting_to_start_are_a_400():
    with FakeKube() as kube:
        kube.add({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                  "spec": {"containers": [{"name": "ray-head", "image": "x"}]},
                  "status": {"phase": "Pending", "containerStatuses": [
                      {"name": "ray-head", "state": {"waiting": {"reason": "ContainerCreating"}}}]}}, log="hello\n")
        core = client.CoreV1Api(api(kube))
        with pytest.raises(ApiException) as e:
            core.read_namespaced_pod_log("p", "team", container="ray-head")
        assert e.value.status == 400
        assert body_of(e.value)["message"] == 'container "ray-head" in pod "p" is waiting to start: ContainerCreating'
        kube.starts_after[("team", "p")] = 0  # it starts
        assert core.read_namespaced_pod_log("p", "team", container="ray-head") == "hello\n"


# ---------------------------------------------------------------------------------------------
# RBAC from the chart's own objects


@pytest.fixture(scope="module")
def chart_docs():
    def render(*args):
        out = subprocess.run([str(ensure_helm()), "template", "llmctl", str(CHART), "-n", "team",
                              "--set", "rbac.subjects[0].kind=User", "--set", "rbac.subjects[0].name=ada", *args],
                             capture_output=True, text=True, check=True).stdout
        return schemas.load_yaml_stream(out)
    return {"default": render(), "clusterScope": render("--set", "rbac.clusterScope=true")}


def _ssar(kube, token, verb, resource, namespace=None, group="", subresource=None, name=None) -> bool:
    attrs = {"verb": verb, "resource": resource, "group": group}
    for k, v in (("namespace", namespace), ("subresource", subresource), ("name", name)):
        if v:
            attrs[k] = v
    review = client.AuthorizationV1Api(api(kube, token)).create_self_subject_access_review(
        {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
         "spec": {"resourceAttributes": attrs}})
    return review.status.allowed


def test_rbac_is_what_the_chart_grants_the_cli_user_and_each_pods_account(chart_docs):
    with FakeKube() as kube:
        kube.load_rbac(chart_docs["default"])
        ada, bob = kube.user_token("ada"), kube.user_token("bob")
        run_sa = kube.sa_token("team", "llmctl-run")
        for verb, resource, sub in (("create", "rayjobs", None), ("get", "rayjobs", None), ("delete", "rayjobs", None),
                                    ("list", "pods", None), ("get", "pods", "log")):
            group = "ray.io" if resource == "rayjobs" else ""
            assert _ssar(kube, ada, verb, resource, "team", group, sub), (verb, resource, sub)
            assert not _ssar(kube, bob, verb, resource, "team", group, sub)
            assert not _ssar(kube, ada, verb, resource, "other", group, sub)  # a RoleBinding stops at its namespace
        assert _ssar(kube, ada, "get", "configmaps", "team", name="llmctl-config")
        assert not _ssar(kube, ada, "get", "configmaps", "team", name="other")  # resourceNames
        assert not _ssar(kube, ada, "list", "rayjobs", group="ray.io")  # all namespaces: not by default
        for verb in ("patch", "create", "get"):  # runs report to their storage: their account may do nothing
            assert not _ssar(kube, run_sa, verb, "rayjobs", "team", "ray.io"), verb
        who = client.AuthenticationV1Api(api(kube, run_sa)).create_self_subject_review(
            {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
        assert who.status.user_info.username == "system:serviceaccount:team:llmctl-run"


def _cli(kube, tmp_path, monkeypatch, capsys, token, *argv):
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig(tmp_path / f"kc-{token}", token=token)))
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# `list -A` with and without the chart's opt-in ClusterRole: tests/cli/test_real_cluster.py (real RBAC).


@pytest.mark.parametrize("release", schemas.KUBERAY_RELEASES)
def test_submit_status_logs_cancel_as_the_charts_user_on_every_kuberay(chart_docs, tmp_path, monkeypatch, capsys,
                                                                         release):
    with FakeKube(kuberay=release) as kube:
        kube.load_rbac(chart_docs["clusterScope"])
        kube.add(next(d for d in chart_docs["default"] if d["kind"] == "ConfigMap"))
        ada = kube.user_token("ada")
        rc, out, err = _cli(kube, tmp_path, monkeypatch, capsys, ada, "submit", "--depth", "12", "--gpus", "8",
                            "--storage", "s3://b", "--yes", "-o", "json")
        assert rc == 0, err
        post, pdb = kube.requests[-2:]
        assert post.query == pdb.query == {"fieldValidation": "Strict"}
        schemas.validate(post.body, {"kuberay": release})  # rendered for the release read off the CRD
        # the chart's Role lets its user guard the head against drains (cli/kube/guards.py)
        assert pdb.line.endswith("/poddisruptionbudgets") and "PodDisruptionBudget" not in err
        schemas.validate(pdb.body)
        name = json.loads(out)["metadata"]["name"]
        assert _cli(kube, tmp_path, monkeypatch, capsys, ada, "status", name)[0] == 0
        assert _cli(kube, tmp_path, monkeypatch, capsys, ada, "cancel", name, "--yes")[0] == 0


def test_submit_without_crd_access_falls_back_to_the_configured_or_oldest_release(chart_docs, tmp_path, monkeypatch,
                                                                                 capsys):
    with FakeKube(kuberay="1.6.2") as kube:
        kube.load_rbac(chart_docs["default"])  # no clusterScope: the CRD is not readable
        ada = kube.user_token("ada")
        rc, _, err = _cli(kube, tmp_path, monkeypatch, capsys, ada, "submit", "--depth", "12", "--gpus", "8",
                          "--storage", "s3://b", "--yes")
        assert rc == 0, err
        # the stand-in serves no /openapi/v3 either (a real API server does, to every user: the real-cluster
        # test reads 1.6 there); with neither readable, the oldest release and a warning
        assert "rendering for KubeRay 1.3" in err and "set kuberay.version" in err
        assert "preRunningDeadlineSeconds" not in kube.requests[-2].body["spec"]


def test_submit_to_a_missing_namespace_names_the_namespace(tmp_path, monkeypatch, capsys):
    """submit into a missing namespace: the real 404 is `namespaces "x" not found`."""
    with FakeKube() as kube:
        rc, _, err = _cli(kube, tmp_path, monkeypatch, capsys, kube.token, "submit", "--depth", "12", "--gpus", "8",
                          "--storage", "s3://b", "--yes", "-n", "nope")
        assert rc == 1 and "namespace nope does not exist" in err and "no rayjob" not in err


# ---------------------------------------------------------------------------------------------
# Status subresource, preconditions, deletion policies, Kueue's webhooks


def test_status_is_a_subresource_and_spec_changes_bump_the_generation():
    with FakeKube() as kube:
        custom, name = created_rayjob(kube)
        out = custom.patch_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", name,
                                                    {"status": {"jobStatus": "RUNNING"}})
        assert "status" not in out and out["metadata"]["generation"] == 1  # the main resource ignores status
        out = custom.patch_namespaced_custom_object_status("ray.io", "v1", "team", "rayjobs", name,
                                                           {"status": {"jobStatus": "RUNNING"}})
        assert out["status"] == {"jobStatus": "RUNNING"}
        out = custom.patch_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", name, {"spec": {"suspend": True}})
        assert out["metadata"]["generation"] == 2 and out["status"] == {"jobStatus": "RUNNING"}


def test_stale_resource_version_conflicts_and_no_finalizer_joins_a_deletion():
    with FakeKube() as kube:
        custom, name = created_rayjob(kube)
        with pytest.raises(ApiException) as e:
            custom.patch_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", name,
                                                  {"metadata": {"resourceVersion": "1", "labels": {"a": "b"}}})
        assert e.value.status == 409 and "the object has been modified" in body_of(e.value)["message"]
        custom.delete_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", name, propagation_policy="Foreground")
        stored = kube.get("rayjobs", "team", name)["metadata"]
        assert stored["finalizers"] == [RAYJOB_FINALIZER, "foregroundDeletion"]
        with pytest.raises(ApiException) as e:
            custom.patch_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", name,
                                                  {"metadata": {"finalizers": [*stored["finalizers"], "mine"]}})
        assert e.value.status == 422 and "no new finalizers can be added" in body_of(e.value)["message"]
        assert kube.reconcile() == [name]


@pytest.mark.parametrize("release", schemas.KUEUE_RELEASES)
def test_kueue_webhooks_suspend_queued_runs_and_refuse_ones_that_keep_their_cluster(release):
    with FakeKube(kueue=release) as kube:
        custom = client.CustomObjectsApi(api(kube))
        p = plan(RunSpec(depth=12, gpus=8, storage_root="s3://b"))
        queued = build_rayjob(p, ClusterConfig(queue="h100"), namespace="team")
        made = custom.create_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", queued,
                                                      field_validation="Strict")
        assert made["spec"]["suspend"] is True
        keeps = dict(queued, metadata=dict(queued["metadata"], name="keeps"),
                     spec=dict(queued["spec"], shutdownAfterJobFinishes=False, suspend=False))
        keeps["spec"].pop("ttlSecondsAfterFinished")
        with pytest.raises(ApiException) as e:
            custom.create_namespaced_custom_object("ray.io", "v1", "team", "rayjobs", keeps)
        assert e.value.status == 403 and body_of(e.value)["message"].startswith(
            'admission webhook "vrayjob.kb.io" denied the request: spec.shutdownAfterJobFinishes')
