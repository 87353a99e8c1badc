"""Which KubeRay and Kueue releases llmctl supports, what each one's CRDs know, and how to tell which is installed.

The matrix (tests/cli/kube/test_rayjob.py and tests/test_chart.py validate every rendered object strictly against each
release's CRD schema; tests/crds/SOURCE.md names the upstream tags):

    KubeRay 1.3 - 1.7   (ray-project/kuberay, RayJob ray.io/v1)
    Kueue   0.13 - 0.19 (kubernetes-sigs/kueue; kueue.x-k8s.io/v1beta1 served by all, v1beta2 from 0.15)

Fields newer than the oldest supported release are rendered only for releases whose CRD has them, because an
older operator's API server prunes an unknown field silently under the default field validation (Warn) and
rejects it under Strict. Each entry below was read off the RayJob CRD of each release
(ray-operator/config/crd/bases/ray.io_rayjobs.yaml at the tag).

KubeRay's CRDs carry no release label, so the installed release is inferred from the served RayJob schema:
the newest marker field it contains (MARKERS) bounds the release from below, which is all rendering needs.
Kueue's API versions come from API discovery (`GET /apis/kueue.x-k8s.io`), which every authenticated user may
read (the system:discovery ClusterRole), and its CRD's storage version when readable.
"""

from __future__ import annotations

import re

KUBERAY_SUPPORTED = ((1, 3), (1, 7))
KUEUE_SUPPORTED = ((0, 13), (0, 19))
KUBERAY_LATEST = (1, 7, 0)
KUBERAY_OLDEST = (1, 3, 0)

# RayJob field (dotted path) -> first KubeRay release whose CRD serves it.
RAYJOB_FIELDS = {
    "spec.preRunningDeadlineSeconds": (1, 6, 0),  # rayjob_types.go, KubeRay v1.6.0
    "spec.rayClusterSpec.authOptions": (1, 5, 1),  # RayCluster authOptions (token auth), KubeRay v1.5.1
}
# Marker field in the served RayJob v1 schema -> the release that introduced it (newest first). From a diff
# of the CRDs at v1.3.2 ... v1.7.0: v1.7 adds rayClusterSpec.historyServerOptions, v1.6 preRunningDeadlineSeconds,
# v1.5.1 rayClusterSpec.authOptions, v1.5 deletionStrategy, v1.4 status.rayJobInfo, v1.3 deletionPolicy.
MARKERS = (
    ("spec.rayClusterSpec.historyServerOptions", (1, 7, 0)),
    ("spec.preRunningDeadlineSeconds", (1, 6, 0)),
    ("spec.rayClusterSpec.authOptions", (1, 5, 1)),
    ("spec.deletionStrategy", (1, 5, 0)),
    ("status.rayJobInfo", (1, 4, 0)),
    ("spec.deletionPolicy", (1, 3, 0)),
)
# Ray's token authentication needs Ray >= 2.52.0 (KubeRay refuses authOptions.mode token below it;
# https://docs.ray.io/en/latest/ray-security/token-auth.html).
RAY_TOKEN_AUTH_MIN = (2, 52, 0)


def parse_version(text: str) -> tuple[int, int, int]:
    """"1.6", "v1.6.2", "1.6.2-rc.1" -> (1, 6, 2); ValueError otherwise."""
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:[-+].*)?", str(text).strip())
    if not m:
        raise ValueError(f"not a version: {text!r}")
    return int(m[1]), int(m[2]), int(m[3] or 0)


def fmt(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version[:2])) if len(version) > 2 and version[2] == 0 else ".".join(map(str, version))


def supported(version: tuple[int, ...], product: str = "kuberay") -> bool:
    lo, hi = KUBERAY_SUPPORTED if product == "kuberay" else KUEUE_SUPPORTED
    return lo <= tuple(version[:2]) <= hi


def supported_range(product: str = "kuberay") -> str:
    lo, hi = KUBERAY_SUPPORTED if product == "kuberay" else KUEUE_SUPPORTED
    return f"{fmt(lo)} to {fmt(hi)}"


def kuberay_release(configured: str | None) -> tuple[int, int, int]:
    """The release to render for: the configured/discovered one, else the newest supported. Raises ValueError
    (one line naming the supported range) for a release outside the matrix."""
    if configured is None:
        return KUBERAY_LATEST
    version = parse_version(configured)
    if not supported(version):
        raise ValueError(f"KubeRay {configured} is not supported: llmctl renders RayJobs for KubeRay "
                         f"{supported_range()} (upgrade the operator, or set kuberay.version / --kuberay-version "
                         f"to the installed release)")
    return version


def has(release: tuple[int, int, int], field: str) -> bool:
    return release >= RAYJOB_FIELDS[field]


def _has_path(schema: dict, path: str) -> bool:
    node = schema
    for part in path.split("."):
        node = (node.get("properties") or {}).get(part) if isinstance(node, dict) else None
        if node is None:
            return False
    return True


def kuberay_release_from_crd(crd: dict) -> tuple[int, int, int] | None:
    """The lowest release consistent with a served RayJob CRD (its ray.io/v1 schema); None when it predates
    every marker (older than 1.3) or serves no v1."""
    schema = next((v.get("schema", {}).get("openAPIV3Schema") for v in (crd.get("spec") or {}).get("versions", [])
                   if v.get("name") == "v1" and v.get("served")), None)
    if not schema:
        return None
    return next((release for path, release in MARKERS if _has_path(schema, path)), None)


def kueue_release_from_api(versions: list[str], storage: str | None = None) -> str:
    """Kueue's release range from the served kueue.x-k8s.io versions (and the CRD storage version if known)."""
    if "v1beta2" not in versions:
        return "0.13-0.14" if "v1beta1" in versions else "unknown"
    if storage == "v1beta1":
        return "0.15"
    return ">=0.16" if storage == "v1beta2" else ">=0.15"
