"""Offline validation of the Kubernetes objects we render (submit --dry-run, helm template, k8s/).

- Built-in kinds: kubernetes-validate's schemas for Kubernetes 1.30, strict mode (unknown fields fail).
- CRD kinds (RayJob, RayCluster, LocalQueue, ClusterQueue, ResourceFlavor, PodMonitor, PrometheusRule):
  jsonschema against the CRD's served openAPIV3Schema, kept in tests/crds/ (the one API version we emit,
  extracted from the upstream CRD files; provenance in tests/crds/SOURCE.md). The API server prunes unknown
  fields from custom resources silently, so we check stricter than it does: every schema object that lists
  `properties` and says nothing about extra keys gets `additionalProperties: false`, and a typo fails here
  instead of vanishing there. `metadata` and every embedded PodTemplateSpec are checked against the strict
  Kubernetes schemas too (the CRDs leave metadata untyped).
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

# (apiVersion, kind) -> (source file under shared/schemas, served version kept)
CRDS = {
    ("ray.io/v1", "RayJob"): ("kuberay/ray.io_rayjobs.yaml", "v1"),
    ("ray.io/v1", "RayCluster"): ("kuberay/ray.io_rayclusters.yaml", "v1"),
    ("kueue.x-k8s.io/v1beta2", "LocalQueue"): ("kueue/kueue.x-k8s.io_localqueues.yaml", "v1beta2"),
    ("kueue.x-k8s.io/v1beta2", "ClusterQueue"): ("kueue/kueue.x-k8s.io_clusterqueues.yaml", "v1beta2"),
    ("kueue.x-k8s.io/v1beta2", "ResourceFlavor"): ("kueue/kueue.x-k8s.io_resourceflavors.yaml", "v1beta2"),
    ("monitoring.coreos.com/v1", "PodMonitor"): ("prometheus-operator/monitoring.coreos.com_podmonitors.yaml", "v1"),
    ("monitoring.coreos.com/v1", "PrometheusRule"):
        ("prometheus-operator/monitoring.coreos.com_prometheusrules.yaml", "v1"),
}


class Invalid(AssertionError):
    """An object that the API server (or KubeRay) would reject; the message names the object and field."""


def _crd_file(api_version: str, kind: str) -> Path:
    group, version = api_version.split("/")
    return CRD_DIR / f"{kind.lower()}.{group}.{version}.json"


# ---------------------------------------------------------------------------------------------
# Extraction (run by hand when the shared snapshot changes)


def extract(shared: Path) -> None:
    CRD_DIR.mkdir(exist_ok=True)
    rows = []
    for (api_version, kind), (rel, version) in CRDS.items():
        src = shared / rel
        raw = src.read_bytes()
        crd = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        assert crd["spec"]["names"]["kind"] == kind, f"{src}: kind {crd['spec']['names']['kind']} != {kind}"
        served = {v["name"]: v for v in crd["spec"]["versions"]}
        schema = served[version]["schema"]["openAPIV3Schema"]
        out = _crd_file(api_version, kind)
        out.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        rows.append(f"| {out.name} | {rel} (version {version}) | {hashlib.sha256(raw).hexdigest()} |")
    (CRD_DIR / "SOURCE.md").write_text(
        "# CRD schemas used by tests/schemas.py\n\n"
        "Each file is the `openAPIV3Schema` of one served version, taken unmodified (re-serialised as compact\n"
        "JSON) from the CRD files in the shared snapshot (`shared/schemas/*/SOURCE.md` names the upstream\n"
        "release and commit: KubeRay v1.7.0, Kueue v0.19.2, prometheus-operator v0.93.0; Apache-2.0).\n"
        "Regenerate with `python -m tests.schemas extract ../shared/schemas`.\n\n"
        "| file | source (shared/schemas/...) | sha256 of the source file |\n|---|---|---|\n"
        + "\n".join(rows) + "\n")


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
def _crd_validator(api_version: str, kind: str):
    schema = _strict(json.loads(_crd_file(api_version, kind).read_text()))
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


def validate(obj: dict) -> None:
    """Raise Invalid unless `obj` would be accepted (schema + KubeRay rules)."""
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    where = name_of(obj)
    if (api_version, kind) in CRDS:
        _errors(_crd_validator(api_version, kind), obj, where)
        _errors(_k8s_definition_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"), obj["metadata"],
                f"{where} metadata")
        for path, template in pod_templates(obj):
            _errors(_k8s_definition_validator("io.k8s.api.core.v1.PodTemplateSpec"), template, f"{where} {path}")
        if kind == "RayJob":
            kuberay_rayjob_rules(obj)
        if kind == "RayCluster":
            kuberay_raycluster_rules(obj["spec"], where)
            _dns1035(obj["metadata"]["name"], 53, where)
        return
    validator = _k8s_kind_validator(api_version, kind)
    if validator is None:
        raise Invalid(f"{where}: no schema for {api_version} {kind} in Kubernetes {K8S_VERSION}")
    _errors(validator, obj, where)


def validate_all(objs) -> int:
    n = 0
    for obj in objs:
        validate(obj)
        n += 1
    return n


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


def load_yaml_stream(text: str) -> list[dict]:
    return [d for d in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "extract":
        extract(Path(sys.argv[2]))
        print(f"wrote {', '.join(sorted(p.name for p in CRD_DIR.glob('*.json')))}")
    else:
        raise SystemExit("usage: python -m tests.schemas extract <shared/schemas>")
