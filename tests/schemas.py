"""Offline validation of the Kubernetes objects we render (submit --dry-run, helm template, k8s/), for every
KubeRay and Kueue release llmctl supports.

- Built-in kinds: kubernetes-validate's schemas for Kubernetes 1.30, strict mode (unknown fields fail).
- CRD kinds (RayJob, RayCluster, LocalQueue, ClusterQueue, ResourceFlavor, PodMonitor, PrometheusRule):
  jsonschema against the served openAPIV3Schema of the release under test, kept in tests/crds/<product>/
  v<release>/ (extracted from the upstream CRD files; provenance in tests/crds/SOURCE.md). Judged as a server
  with `fieldValidation=Strict` judges (kubernetes apiserver `endpoints/handlers/create.go`; the CRD
  structural-schema rules in https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/
  custom-resource-definitions/#field-pruning): every schema object that lists `properties` and does not
  say `x-kubernetes-preserve-unknown-fields` gets `additionalProperties: false`, so a field the installed
  release does not know fails here instead of being pruned there (the default `Warn`). `metadata` and every
  embedded PodTemplateSpec are checked against the strict Kubernetes schemas too (the CRDs leave the
  top-level metadata untyped).
- An apiVersion the release does not serve (kueue.x-k8s.io/v1beta2 before Kueue 0.15) fails like the API
  server's "no matches for kind".
- KubeRay's own admission rules (ray-operator/controllers/ray/utils/validation.go, restated): name length
  and DNS-1035, suspend needs shutdownAfterJobFinishes, TTL needs shutdown, clusterSelector excludes suspend,
  positive deadlines. CEL rules in the CRDs (`x-kubernetes-validations`) are not evaluated; none of them
  touches a field we set (deletionStrategy, managedBy, gcsFaultToleranceOptions).

Regenerate the extracted CRDs from the shared schema snapshot: `python -m tests.schemas extract ../shared/schemas`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

K8S_VERSION = "1.30.0"
CRD_DIR = Path(__file__).parent / "crds"

# The supported matrix: every release here is tested (README, docs/kubernetes.md). Kueue 0.16-0.18 serve the
# same two API versions as 0.19 with the same storage version; the snapshot holds the releases listed.
KUBERAY_RELEASES = ("1.3.2", "1.4.2", "1.5.2", "1.6.2", "1.7.0")
KUEUE_RELEASES = ("0.13.4", "0.14.2", "0.15.0", "0.19.2")
PROMETHEUS_OPERATOR_RELEASE = "0.93.0"
LATEST = {"kuberay": KUBERAY_RELEASES[-1], "kueue": KUEUE_RELEASES[-1],
          "prometheus-operator": PROMETHEUS_OPERATOR_RELEASE}
RELEASES = {"kuberay": KUBERAY_RELEASES, "kueue": KUEUE_RELEASES,
            "prometheus-operator": (PROMETHEUS_OPERATOR_RELEASE,)}

# (group, kind) -> (product, CRD file name upstream, plural)
KINDS = {
    ("ray.io", "RayJob"): ("kuberay", "ray.io_rayjobs.yaml", "rayjobs"),
    ("ray.io", "RayCluster"): ("kuberay", "ray.io_rayclusters.yaml", "rayclusters"),
    ("ray.io", "RayService"): ("kuberay", "ray.io_rayservices.yaml", "rayservices"),  # llmctl serve
    ("kueue.x-k8s.io", "LocalQueue"): ("kueue", "kueue.x-k8s.io_localqueues.yaml", "localqueues"),
    ("kueue.x-k8s.io", "ClusterQueue"): ("kueue", "kueue.x-k8s.io_clusterqueues.yaml", "clusterqueues"),
    ("kueue.x-k8s.io", "ResourceFlavor"): ("kueue", "kueue.x-k8s.io_resourceflavors.yaml", "resourceflavors"),
    ("kueue.x-k8s.io", "WorkloadPriorityClass"):  # the chart's and k8s/kueue's run and sweep priorities
        ("kueue", "kueue.x-k8s.io_workloadpriorityclasses.yaml", "workloadpriorityclasses"),
    ("monitoring.coreos.com", "PodMonitor"):
        ("prometheus-operator", "monitoring.coreos.com_podmonitors.yaml", "podmonitors"),
    ("monitoring.coreos.com", "PrometheusRule"):
        ("prometheus-operator", "monitoring.coreos.com_prometheusrules.yaml", "prometheusrules"),
}
# Where the prometheus-operator CRDs sit in the shared snapshot (one release, no version folder).
_FLAT_SOURCES = {"prometheus-operator"}


class Invalid(AssertionError):
    """An object that the API server (or KubeRay) would reject; the message names the object and field."""


def _release_dir(product: str, release: str) -> Path:
    return CRD_DIR / product / f"v{release}"


def _crd_file(group: str, kind: str, version: str, product: str, release: str) -> Path:
    return _release_dir(product, release) / f"{kind.lower()}.{group}.{version}.json"


def served_versions(group: str, kind: str, release: str | None = None) -> list[str]:
    """API versions of (group, kind) that `release` of its product serves (newest last), from the files."""
    product = KINDS[(group, kind)][0]
    release = release or LATEST[product]
    files = sorted(_release_dir(product, release).glob(f"{kind.lower()}.{group}.*.json"))
    return [f.name[len(f"{kind.lower()}.{group}."):-len(".json")] for f in files]


def crd_schema(group: str, kind: str, version: str, release: str | None = None) -> dict | None:
    """The served openAPIV3Schema, or None when that release does not serve that version."""
    product = KINDS[(group, kind)][0]
    f = _crd_file(group, kind, version, product, release or LATEST[product])
    return json.loads(f.read_text()) if f.exists() else None


def crd_object(group: str, kind: str, release: str | None = None) -> dict:
    """A CustomResourceDefinition as the API server serves it (GET .../customresourcedefinitions/<name>),
    rebuilt from the kept schemas: names, scope, and each served version with its schema."""
    product, _, plural = KINDS[(group, kind)]
    release = release or LATEST[product]
    meta = json.loads((_release_dir(product, release) / "crds.json").read_text())[f"{plural}.{group}"]
    versions = [{"name": v, "served": True, "storage": v == meta["storage"],
                 "schema": {"openAPIV3Schema": crd_schema(group, kind, v, release)}}
                for v in served_versions(group, kind, release)]
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.{group}"},
            "spec": {"group": group, "names": {"kind": kind, "plural": plural}, "scope": meta["scope"],
                     "versions": versions}}


# Every (apiVersion, kind) served by some supported release: what tests treat as a custom resource.
def _all_crds() -> set[tuple[str, str]]:
    out = set()
    for (group, kind), (product, _, _) in KINDS.items():
        for release in RELEASES[product]:
            out |= {(f"{group}/{v}", kind) for v in served_versions(group, kind, release)}
    return out


# ---------------------------------------------------------------------------------------------
# Extraction (run by hand when the shared snapshot changes)


def extract(shared: Path) -> None:
    rows = []
    for (group, kind), (product, fname, plural) in KINDS.items():
        for release in RELEASES[product]:
            src = shared / product / fname if product in _FLAT_SOURCES else shared / product / f"v{release}" / fname
            raw = src.read_bytes()
            crd = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            assert crd["spec"]["names"]["kind"] == kind, f"{src}: kind {crd['spec']['names']['kind']} != {kind}"
            out_dir = _release_dir(product, release)
            out_dir.mkdir(parents=True, exist_ok=True)
            served = [v for v in crd["spec"]["versions"] if v.get("served")]
            if product == "kuberay":  # ray.io/v1alpha1 is deprecated and never emitted: keep v1 only
                served = [v for v in served if v["name"] == "v1"]
            for v in served:
                out = _crd_file(group, kind, v["name"], product, release)
                out.write_text(json.dumps(v["schema"]["openAPIV3Schema"], separators=(",", ":"), sort_keys=True)
                               + "\n")
            index_file = out_dir / "crds.json"
            index = json.loads(index_file.read_text()) if index_file.exists() else {}
            index[f"{plural}.{group}"] = {"scope": crd["spec"]["scope"],
                                          "storage": next(v["name"] for v in crd["spec"]["versions"]
                                                          if v.get("storage"))}
            index_file.write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
            rows.append(f"| {product}/v{release}/ | {src.relative_to(shared)} | "
                        f"{', '.join(v['name'] for v in served)} | {hashlib.sha256(raw).hexdigest()} |")
    (CRD_DIR / "SOURCE.md").write_text(
        "# CRD schemas used by tests/schemas.py and tests/kube_fake.py\n\n"
        "`<product>/v<release>/<kind>.<group>.<version>.json` is the `openAPIV3Schema` of one served API version,\n"
        "taken unmodified (re-serialised as compact JSON) from the CRD file of that upstream release:\n"
        "ray-project/kuberay `ray-operator/config/crd/bases/` at tags v1.3.2, v1.4.2, v1.5.2, v1.6.2, v1.7.0;\n"
        "kubernetes-sigs/kueue `config/components/crd/bases/` at v0.13.4, v0.14.2, v0.15.0, v0.19.2;\n"
        "prometheus-operator `example/prometheus-operator-crd/` at v0.93.0 (all Apache-2.0). `crds.json` keeps\n"
        "each CRD's scope and storage version. KubeRay's deprecated `v1alpha1` is left out (never emitted).\n"
        "Regenerate with `python -m tests.schemas extract <snapshot of those files>`.\n\n"
        "| folder | source file | versions kept | sha256 of the source file |\n|---|---|---|---|\n"
        + "\n".join(rows) + "\n")


CRDS = _all_crds() if CRD_DIR.exists() else set()


# ---------------------------------------------------------------------------------------------
# Schemas


def _strict(schema):
    """Close every object schema that lists properties and is silent about extra keys."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def _crd_validator(api_version: str, kind: str, release: str):
    group, version = api_version.split("/")
    schema = crd_schema(group, kind, version, release)
    if schema is None:
        return None
    schema = _strict(schema)
    schema["properties"]["metadata"] = {"type": "object"}  # checked against ObjectMeta separately
    return jsonschema.Draft202012Validator(schema)


@functools.lru_cache(maxsize=None)
def _k8s_schema_dir() -> str:
    """kubernetes-validate's strict schema directory for K8S_VERSION (its own version-resolution rule)."""
    u = kubernetes_validate.utils
    version = [v for v in u.all_versions() if u.major_minor(v) <= u.major_minor(K8S_VERSION)][-1]
    return f"kubernetes-json-schema/v{version}-local-strict"


@functools.lru_cache(maxsize=None)
def _k8s_registry():
    from referencing import Registry, Resource

    defs = kubernetes_validate.utils.schema_contents(f"{_k8s_schema_dir()}/_definitions.json", K8S_VERSION)
    return defs["$id"], Resource.from_contents(defs) @ Registry()


@functools.lru_cache(maxsize=None)
def _k8s_definition_validator(definition: str):
    """A validator for one definition in kubernetes-validate's strict schema set."""
    base, registry = _k8s_registry()
    return jsonschema.Draft202012Validator({"$ref": f"{base}#/$defs/{definition}"}, registry=registry)


@functools.lru_cache(maxsize=None)
def _k8s_kind_validator(api_version: str, kind: str):
    """What kubernetes_validate.validate(obj, K8S_VERSION, strict=True) builds, loaded once per kind
    (it re-reads the 1.3 MB definitions file on every call)."""
    api = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = kubernetes_validate.utils.schema_contents(f"{_k8s_schema_dir()}/{kind.lower()}-{api}.json",
                                                           K8S_VERSION)
    except FileNotFoundError:
        return None
    return jsonschema.Draft202012Validator(schema, registry=_k8s_registry()[1])


def _errors(validator, instance, where: str) -> None:
    errs = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errs:
        lines = [f"{where}.{'.'.join(map(str, e.absolute_path))}: {e.message[:300]}" for e in errs[:5]]
        raise Invalid("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Validation


def name_of(obj: dict) -> str:
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


def release_of(obj: dict, releases: dict | None = None) -> str | None:
    """The product release `obj` is judged against: `releases` ({"kuberay": "1.5.2", ...}) else the latest."""
    group = (obj.get("apiVersion") or "").rpartition("/")[0]
    known = KINDS.get((group, obj.get("kind")))
    if known is None:
        return None
    return (releases or {}).get(known[0]) or LATEST[known[0]]


def validate(obj: dict, releases: dict | None = None) -> None:
    """Raise Invalid unless `obj` would be accepted (strict schema + KubeRay rules) by the releases given,
    e.g. {"kuberay": "1.5.2", "kueue": "0.13.4"}; missing products mean the latest supported release."""
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    where = name_of(obj)
    release = release_of(obj, releases)
    if release is not None:
        validator = _crd_validator(api_version, kind, release)
        if validator is None:
            raise Invalid(f"{where}: no matches for kind {kind!r} in version {api_version!r} "
                          f"(release {release} serves {', '.join(served_versions(*_gk(obj), release)) or 'none'})")
        _errors(validator, obj, where)
        _errors(_k8s_definition_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"), obj["metadata"],
                f"{where} metadata")
        for path, template in pod_templates(obj):
            _errors(_k8s_definition_validator("io.k8s.api.core.v1.PodTemplateSpec"), template, f"{where} {path}")
        if kind == "RayJob":
            kuberay_rayjob_rules(obj)
        if kind == "RayCluster":
            kuberay_raycluster_rules(obj["spec"], where)
            _dns1035(obj["metadata"]["name"], 53, where)
        if kind == "RayService":
            kuberay_rayservice_rules(obj)
        return
    validator = _k8s_kind_validator(api_version, kind)
    if validator is None:
        raise Invalid(f"{where}: no schema for {api_version} {kind} in Kubernetes {K8S_VERSION}")
    _errors(validator, obj, where)


def _gk(obj: dict) -> tuple[str, str]:
    return obj["apiVersion"].rpartition("/")[0], obj["kind"]


def validate_all(objs, releases: dict | None = None) -> int:
    n = 0
    for obj in objs:
        validate(obj, releases)
        n += 1
    return n


def unknown_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields of `obj` that `schema` does not declare, as the API server's strict decoder names them
    ("spec.foo"; apimachinery `runtime/serializer` strict errors, pruning rules of apiextensions
    `pkg/apiserver/schema/pruning/algorithm.go`): an object schema with `properties` and neither
    `additionalProperties` nor `x-kubernetes-preserve-unknown-fields` keeps only those properties."""
    out: list[str] = []
    if isinstance(obj, dict) and isinstance(schema, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for k, v in obj.items():
            p = f"{path}.{k}" if path else k
            if props is not None and k in props:
                out += unknown_fields(v, props[k], p)
            elif isinstance(extra, dict):
                out += unknown_fields(v, extra, p)
            elif props is not None and not extra and not schema.get("x-kubernetes-preserve-unknown-fields"):
                out.append(p)
    elif isinstance(obj, list) and isinstance(schema, dict) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(obj):
            out += unknown_fields(v, schema["items"], f"{path}[{i}]")
    return out


def pod_templates(obj: dict):
    """(path, PodTemplateSpec) for every pod template inside a RayJob or RayCluster."""
    spec = obj.get("spec") or {}
    if obj.get("kind") == "RayJob":
        if "submitterPodTemplate" in spec:
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"]
        cluster, prefix = spec.get("rayClusterSpec"), "spec.rayClusterSpec"
    elif obj.get("kind") == "RayCluster":
        cluster, prefix = spec, "spec"
    else:
        return
    if cluster:
        yield f"{prefix}.headGroupSpec.template", cluster["headGroupSpec"]["template"]
        for i, g in enumerate(cluster.get("workerGroupSpecs") or []):
            yield f"{prefix}.workerGroupSpecs[{i}].template", g["template"]


_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def _dns1035(name: str, limit: int, where: str) -> None:
    if len(name) > limit or not _DNS1035.fullmatch(name):
        raise Invalid(f"{where}: name {name!r} must be a DNS-1035 label of at most {limit} characters")


def kuberay_rayjob_rules(obj: dict) -> None:
    where, spec = name_of(obj), obj["spec"]
    _dns1035(obj["metadata"]["name"], 47, where)  # RayCluster limit 53 minus the 6-char suffix KubeRay adds
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if spec.get("suspend") and not shutdown:
        raise Invalid(f"{where}: suspend requires shutdownAfterJobFinishes: true")
    if spec.get("ttlSecondsAfterFinished", 0) < 0 or (spec.get("ttlSecondsAfterFinished", 0) > 0 and not shutdown):
        raise Invalid(f"{where}: ttlSecondsAfterFinished must be >= 0 and needs shutdownAfterJobFinishes")
    selector = spec.get("clusterSelector") or {}
    if selector:
        if spec.get("suspend"):
            raise Invalid(f"{where}: clusterSelector cannot be suspended (Kueue)")
        if not selector.get("ray.io/cluster"):
            raise Invalid(f"{where}: clusterSelector needs ray.io/cluster")
    elif not spec.get("rayClusterSpec"):
        raise Invalid(f"{where}: one of rayClusterSpec or clusterSelector is required")
    if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
        raise Invalid(f"{where}: activeDeadlineSeconds must be positive")
    if spec.get("backoffLimit", 0) < 0:
        raise Invalid(f"{where}: backoffLimit must be >= 0")
    try:
        yaml.safe_load(spec.get("runtimeEnvYAML", ""))
    except yaml.YAMLError as e:
        raise Invalid(f"{where}: runtimeEnvYAML is not YAML: {e}") from None
    if spec.get("rayClusterSpec"):
        kuberay_raycluster_rules(spec["rayClusterSpec"], where)
    if spec.get("submitterPodTemplate", {}).get("spec", {}).get("restartPolicy", "Never") != "Never":
        raise Invalid(f"{where}: the submitter pod must not restart (restartPolicy: Never)")


def kuberay_raycluster_rules(cluster: dict, where: str) -> None:
    groups = [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
    for name, g in groups:
        if not g["template"]["spec"].get("containers"):
            raise Invalid(f"{where}: group {name} has no container")
        params = g.get("rayStartParams") or {}
        if g.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            raise Invalid(f"{where}: group {name} sets resources both in rayStartParams and resources")
        if "labels" in params:
            raise Invalid(f"{where}: group {name}: rayStartParams.labels is not supported")
    for g in cluster.get("workerGroupSpecs", []):
        if not g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 2**31 - 1):
            raise Invalid(f"{where}: group {g['groupName']}: need minReplicas <= replicas <= maxReplicas")


def kuberay_rayservice_rules(obj: dict) -> None:
    """KubeRay's admission rules for RayServices (ray-operator/controllers/ray/utils/validation.go,
    ValidateRayServiceMetadata and ValidateRayServiceSpec, restated)."""
    where, spec = name_of(obj), obj["spec"]
    _dns1035(obj["metadata"]["name"], 47, where)  # the RayCluster limit 53 minus the suffix KubeRay adds
    cluster = spec["rayClusterConfig"]
    kuberay_raycluster_rules(cluster, where)
    if (cluster["headGroupSpec"].get("headService") or {}).get("metadata", {}).get("name"):
        raise Invalid(f"{where}: headService.metadata.name must not be set")
    try:
        serve = yaml.safe_load(spec.get("serveConfigV2", ""))
    except yaml.YAMLError as e:
        raise Invalid(f"{where}: serveConfigV2 is not YAML: {e}") from None
    if not isinstance(serve, dict) or not serve.get("applications"):
        raise Invalid(f"{where}: serveConfigV2 names no application")


def load_yaml_stream(text: str) -> list[dict]:
    return [d for d in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "extract":
        extract(Path(sys.argv[2]))
        print(f"wrote {len(list(CRD_DIR.rglob('*.json')))} files under {CRD_DIR}")
    else:
        raise SystemExit("usage: python -m tests.schemas extract <shared/schemas>")
