"""Offline validation of the RayService `llmctl serve` renders, under every KubeRay release's RayService CRD.

tests/crds/kuberay/<version>/rayservice.ray.io.v1.json is the served `ray.io/v1` openAPIV3Schema of that
release's ray.io_rayservices.yaml (KubeRay's ray-operator/config/crd/bases/ at the release tag), re-serialised
as compact JSON; provenance in tests/crds/kuberay/SOURCE.md. Checked as strictly as tests/schemas.py checks
the RayJob: unknown fields fail (`additionalProperties: false` wherever the schema lists properties), metadata
and both pod templates against Kubernetes' strict ObjectMeta/PodTemplateSpec schemas, and KubeRay's admission
rules for RayServices (ray-operator/controllers/ray/utils/validation.go, ValidateRayServiceMetadata and
ValidateRayServiceSpec, restated): a DNS-1035 name of at most 47 characters, the RayCluster rules on
rayClusterConfig, no head Service name.

Regenerate: `python -m tests.rayservice_crds extract ../shared/schemas/kuberay`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path

import jsonschema
import yaml

from tests import schemas

DIR = schemas.CRD_DIR / "kuberay"
VERSIONS = tuple(sorted((p.name for p in DIR.glob("v*") if p.is_dir()),
                        key=lambda v: tuple(int(x) for x in v[1:].split("."))))
MAX_NAME = 47


def extract(kuberay: Path) -> None:
    rows = []
    for src in sorted(kuberay.glob("v*/ray.io_rayservices.yaml")):
        raw = src.read_bytes()
        crd = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        schema = {v["name"]: v for v in crd["spec"]["versions"]}["v1"]["schema"]["openAPIV3Schema"]
        out = DIR / src.parent.name / "rayservice.ray.io.v1.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        rows.append(f"| {src.parent.name}/rayservice.ray.io.v1.json | {src.parent.name}/ray.io_rayservices.yaml "
                    f"(version v1) | {hashlib.sha256(raw).hexdigest()} |")
    (DIR / "SOURCE.md").write_text(
        "# KubeRay RayService CRD schemas, one per supported release\n\n"
        "The `ray.io/v1` openAPIV3Schema of `ray-operator/config/crd/bases/ray.io_rayservices.yaml` at each KubeRay\n"
        "release tag (github.com/ray-project/kuberay; Apache-2.0), taken unmodified and re-serialised as compact\n"
        "JSON. Used by tests/rayservice_crds.py. Tags: v1.3.2 66e4132c0d3f, v1.4.2 34ea80e0f51f, v1.5.2 9f65eca1d622,\n"
        "v1.6.2 598eb66aa077, v1.7.0 59d663aeec13.\n\n"
        "| file | source | sha256 of the source file |\n|---|---|---|\n" + "\n".join(rows) + "\n")


@functools.lru_cache(maxsize=None)
def _validator(version: str):
    schema = schemas._strict(json.loads((DIR / version / "rayservice.ray.io.v1.json").read_text()))
    schema["properties"]["metadata"] = {"type": "object"}  # checked against ObjectMeta below
    return jsonschema.Draft202012Validator(schema)


def validate(obj: dict, version: str) -> None:
    """Raise schemas.Invalid unless KubeRay `version` would accept the RayService `obj`."""
    where = f"{schemas.name_of(obj)} (KubeRay {version})"
    if (obj.get("apiVersion"), obj.get("kind")) != ("ray.io/v1", "RayService"):
        raise schemas.Invalid(f"{where}: not a ray.io/v1 RayService")
    schemas._errors(_validator(version), obj, where)
    schemas._errors(schemas._k8s_definition_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"),
                    obj["metadata"], f"{where} metadata")
    cluster = obj["spec"]["rayClusterConfig"]
    templates = [("head", cluster["headGroupSpec"]["template"])]
    templates += [(g["groupName"], g["template"]) for g in cluster.get("workerGroupSpecs") or []]
    for group, template in templates:
        schemas._errors(schemas._k8s_definition_validator("io.k8s.api.core.v1.PodTemplateSpec"), template,
                        f"{where} group {group} template")
    schemas._dns1035(obj["metadata"]["name"], MAX_NAME, where)
    schemas.kuberay_raycluster_rules(cluster, where)
    if (cluster["headGroupSpec"].get("headService") or {}).get("metadata", {}).get("name"):
        raise schemas.Invalid(f"{where}: headService.metadata.name must not be set")
    try:
        serve = yaml.safe_load(obj["spec"].get("serveConfigV2", ""))
    except yaml.YAMLError as e:
        raise schemas.Invalid(f"{where}: serveConfigV2 is not YAML: {e}") from None
    if not isinstance(serve, dict) or not serve.get("applications"):
        raise schemas.Invalid(f"{where}: serveConfigV2 names no application")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "extract":
        extract(Path(sys.argv[2]))
        print(f"wrote {', '.join(str(p.relative_to(DIR)) for p in sorted(DIR.glob('v*/*.json')))}")
    else:
        raise SystemExit("usage: python -m tests.rayservice_crds extract <shared/schemas/kuberay>")
