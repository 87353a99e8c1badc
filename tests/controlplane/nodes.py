"""Simulated nodes with the allocatable, labels and taints of real H100 node types, and one CPU node.

The numbers are derived, not measured on a node: each cloud's documented reservation formula applied to
the machine type's published size (docs/kubernetes.md, "Simulated nodes", gives the sources and the
arithmetic). A real node reports slightly less capacity than the nominal size (the kernel keeps some), so
real allocatable memory is a little lower still; tests should compare with these objects, not with
constants of their own.
"""

from __future__ import annotations

GI = 1024**3
MI = 1024**2


def _tiered(total: float, tiers) -> float:
    out, rest = 0.0, total
    for size, share in tiers:
        take = min(rest, size)
        out += take * share
        rest -= take
    return out


def cpu_reserved(cores: int) -> float:
    """GKE's and the EKS AMI's CPU reservation: 6% of the first core, 1% of the next, 0.5% of the next 2,
    0.25% of the rest."""
    return _tiered(cores, [(1, 0.06), (1, 0.01), (2, 0.005), (float("inf"), 0.0025)])


def gke_memory_reserved(gib: float) -> float:
    """GKE: 25% of the first 4 GiB, 20% of the next 4, 10% of the next 8, 6% of the next 112, 2% above 128."""
    return _tiered(gib, [(4, 0.25), (4, 0.20), (8, 0.10), (112, 0.06), (float("inf"), 0.02)])


def _milli(cores: float) -> str:
    return f"{round(cores * 1000)}m"


def _ki(nbytes: float) -> str:
    return f"{int(nbytes // 1024)}Ki"


def _gke_a3_highgpu_8g() -> dict:
    # 208 vCPU, 1872 GB memory, 8 x H100 80GB, 16 x 375 GB local SSD used as ephemeral storage
    # (--ephemeral-storage-local-ssd, as GKE's A3 guides create the pool). Memory: formula + 100 MiB eviction.
    # Ephemeral: 10% eviction threshold and min(50%, 6 GiB + 35%, 100 GiB) system reservation.
    mem = 1872 * GI - gke_memory_reserved(1872) * GI - 100 * MI
    disk = 16 * 375 * GI
    eph = disk - min(0.5 * disk, 6 * GI + 0.35 * disk, 100 * GI) - 0.1 * disk
    return {
        "capacity": {"cpu": "208", "memory": _ki(1872 * GI), "ephemeral-storage": _ki(disk),
                     "nvidia.com/gpu": "8", "pods": "110"},
        "allocatable": {"cpu": _milli(208 - cpu_reserved(208)), "memory": _ki(mem), "ephemeral-storage": _ki(eph),
                        "nvidia.com/gpu": "8", "pods": "110"},
        "labels": {
            "node.kubernetes.io/instance-type": "a3-highgpu-8g",
            "cloud.google.com/machine-family": "a3",
            "cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
            "cloud.google.com/gke-accelerator-count": "8",
            "cloud.google.com/gke-gpu": "true",
            "cloud.google.com/gke-nodepool": "a3-highgpu",
            "cloud.google.com/gke-ephemeral-storage-local-ssd": "true",
            "topology.kubernetes.io/region": "us-central1",
            "topology.kubernetes.io/zone": "us-central1-a",
        },
        # GKE taints every GPU node pool (it also adds a matching toleration to GPU pods itself).
        "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
    }


def _eks_p5_48xlarge() -> dict:
    # 192 vCPU, 2048 GiB, 8 x H100 80GB (HBM3). EKS AMI: max pods 100 (eni-max-pods.txt), kube-reserved
    # memory 11 MiB x max pods + 255 MiB, eviction 100 MiB, CPU as GKE; ephemeral storage on the managed
    # node group's default 20 GiB root volume: 1 GiB kube-reserved, 10% eviction. No GPU taint by default.
    mem = 2048 * GI - (11 * 100 + 255) * MI - 100 * MI
    disk = 20 * GI
    return {
        "capacity": {"cpu": "192", "memory": _ki(2048 * GI), "ephemeral-storage": _ki(disk),
                     "nvidia.com/gpu": "8", "vpc.amazonaws.com/efa": "32", "pods": "100"},
        "allocatable": {"cpu": _milli(192 - cpu_reserved(192)), "memory": _ki(mem),
                        "ephemeral-storage": _ki(disk - GI - 0.1 * disk),
                        "nvidia.com/gpu": "8", "vpc.amazonaws.com/efa": "32", "pods": "100"},
        "labels": {
            "node.kubernetes.io/instance-type": "p5.48xlarge",
            "eks.amazonaws.com/nodegroup": "p5",
            "eks.amazonaws.com/capacityType": "ON_DEMAND",
            "k8s.amazonaws.com/accelerator": "nvidia-h100",
            # What NVIDIA's GPU feature discovery (GPU operator) labels.
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            "nvidia.com/gpu.count": "8",
            "nvidia.com/gpu.memory": "81559",
            "topology.kubernetes.io/region": "us-east-2",
            "topology.kubernetes.io/zone": "us-east-2b",
        },
        "taints": [],
    }


def _aks_nd96isr_h100_v5() -> dict:
    # 96 vCPU, 1900 GiB, 8 x H100 80GB. AKS (1.29+): kube-reserved memory 20 MB x max pods + 50 MB with the
    # Azure CNI overlay default of 250 pods, eviction 100 MiB; CPU kube-reserved from AKS's table (740m at
    # 64 cores, 10m per 2 cores past it: an estimate for 96 cores); ephemeral storage on the default 128 GiB
    # OS disk with 10% eviction. GPU pools carry no taint unless the user adds one.
    mem = 1900 * GI - (20 * 250 + 50) * MI - 100 * MI
    disk = 128 * GI
    return {
        "capacity": {"cpu": "96", "memory": _ki(1900 * GI), "ephemeral-storage": _ki(disk),
                     "nvidia.com/gpu": "8", "pods": "250"},
        "allocatable": {"cpu": _milli(96 - 0.9), "memory": _ki(mem), "ephemeral-storage": _ki(0.9 * disk),
                        "nvidia.com/gpu": "8", "pods": "250"},
        "labels": {
            "node.kubernetes.io/instance-type": "Standard_ND96isr_H100_v5",
            "kubernetes.azure.com/agentpool": "h100",
            "kubernetes.azure.com/accelerator": "nvidia",
            "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            "nvidia.com/gpu.count": "8",
            "topology.kubernetes.io/region": "eastus",
            "topology.kubernetes.io/zone": "eastus-1",
        },
        "taints": [],
    }


def _cpu_node() -> dict:
    # A GKE n2-standard-16 (16 vCPU, 64 GB) for Ray heads and the CLI's small pods; 100 GB boot disk.
    mem = 64 * GI - gke_memory_reserved(64) * GI - 100 * MI
    disk = 100 * GI
    eph = disk - min(0.5 * disk, 6 * GI + 0.35 * disk, 100 * GI) - 0.1 * disk
    return {
        "capacity": {"cpu": "16", "memory": _ki(64 * GI), "ephemeral-storage": _ki(disk), "pods": "110"},
        "allocatable": {"cpu": _milli(16 - cpu_reserved(16)), "memory": _ki(mem), "ephemeral-storage": _ki(eph),
                        "pods": "110"},
        "labels": {
            "node.kubernetes.io/instance-type": "n2-standard-16",
            "cloud.google.com/machine-family": "n2",
            "cloud.google.com/gke-nodepool": "default-pool",
            "topology.kubernetes.io/region": "us-central1",
            "topology.kubernetes.io/zone": "us-central1-a",
        },
        "taints": [],
    }


NODE_TYPES = {
    "gke-a3-highgpu-8g": _gke_a3_highgpu_8g,
    "eks-p5.48xlarge": _eks_p5_48xlarge,
    "aks-nd96isr-h100-v5": _aks_nd96isr_h100_v5,
    "gke-n2-standard-16": _cpu_node,
}

# The session's nodes: two GKE A3 nodes (a 16-GPU worker group spans two), one of each other GPU type,
# one CPU node.
DEFAULT_NODES = {
    "gke-a3-0": "gke-a3-highgpu-8g",
    "gke-a3-1": "gke-a3-highgpu-8g",
    "eks-p5-0": "eks-p5.48xlarge",
    "aks-nd96-0": "aks-nd96isr-h100-v5",
    "cpu-0": "gke-n2-standard-16",
}


def node_manifest(name: str, node_type: str) -> dict:
    spec = NODE_TYPES[node_type]()
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
              "type": "kwok", "llmctl.test/node-type": node_type, **spec["labels"]}
    return {
        "apiVersion": "v1", "kind": "Node",
        # kwok manages exactly the nodes annotated so (--manage-nodes-with-annotation-selector).
        "metadata": {"name": name, "labels": labels, "annotations": {"kwok.x-k8s.io/node": "fake"}},
        "spec": {"taints": spec["taints"]} if spec["taints"] else {},
        "status": {"capacity": spec["capacity"], "allocatable": spec["allocatable"],
                   "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux",
                                "kubeletVersion": "fake", "containerRuntimeVersion": "fake"}},
    }
