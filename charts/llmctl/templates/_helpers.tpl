{{/*
Chart name, overridable with nameOverride. Truncated to 63 characters: Kubernetes label values and
DNS-1123 names stop there.
*/}}
{{- define "llmctl.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Prefix for the names of the objects this release creates: fullnameOverride, else "<release>-<chart>",
collapsed to the release name when it already contains the chart name. 63 characters at most (DNS-1123
label limit); the longest suffix added below is "-dashboard-<file>", so that suffix is truncated again.
*/}}
{{- define "llmctl.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"chart-version" for the helm.sh/chart label.
*/}}
{{- define "llmctl.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The standard labels on every object. part-of=llmctl is also what the PodMonitors select on, together with
llmctl.dev/role (set on pod templates here and by `llmctl submit`).
*/}}
{{- define "llmctl.labels" -}}
helm.sh/chart: {{ include "llmctl.chart" . }}
{{ include "llmctl.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llmctl
{{- end }}

{{/*
Selector labels: name + instance only (stable across upgrades).
*/}}
{{- define "llmctl.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmctl.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The trainer image reference: repository:tag, tag defaulting to the chart's appVersion.
*/}}
{{- define "llmctl.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) }}
{{- end }}

{{/*
ServiceAccount for submitting runs (CI jobs, in-cluster tools); users are bound through rbac.subjects.
*/}}
{{- define "llmctl.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llmctl.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
ServiceAccount of the runs' head pods: allowed to annotate their own RayJob with progress. Empty when
neither created nor named (runs then use the namespace default account, without a token).
*/}}
{{- define "llmctl.runServiceAccountName" -}}
{{- if .Values.runServiceAccount.create }}
{{- default (printf "%s-run" (include "llmctl.fullname" . | trunc 59 | trimSuffix "-")) .Values.runServiceAccount.name }}
{{- else }}
{{- .Values.runServiceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Kueue queue runs go to: config.queue, else the LocalQueue this chart creates.
*/}}
{{- define "llmctl.queue" -}}
{{- if .Values.config.queue }}
{{- .Values.config.queue }}
{{- else if .Values.kueue.localQueue.create }}
{{- .Values.kueue.localQueue.name }}
{{- end }}
{{- end }}

{{/*
Name of the warm RayCluster: at most 53 characters and DNS-1035 (KubeRay's limit for RayCluster names).
*/}}
{{- define "llmctl.rayClusterName" -}}
{{- default (printf "%s-warm" (include "llmctl.fullname" . | trunc 48 | trimSuffix "-")) .Values.rayCluster.name | trunc 53 | trimSuffix "-" }}
{{- end }}

{{/*
Pod and container security shared by every Ray pod (the same as `llmctl submit` renders): non-root uid
1000 (the image's user), no privilege escalation, all capabilities dropped, read-only root filesystem
with /tmp as an emptyDir.
*/}}
{{- define "llmctl.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "llmctl.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .readOnly }}
capabilities:
  drop: ["ALL"]
{{- end }}

{{/*
Node selector of GPU nodes of one type (dict "root" $ "gpuType" "h100"), as YAML (empty when none):
config.workers.nodeSelectors when set (only the types listed there), else config.workers.gpuLabels' label
with the usual value for the type. The same table as cli/kube/config.py (tests/test_chart.py compares).
*/}}
{{- define "llmctl.gpuSelector" -}}
{{- $w := .root.Values.config.workers }}
{{- if $w.nodeSelectors }}
{{- with get $w.nodeSelectors .gpuType }}{{ toYaml . }}{{ end }}
{{- else }}
{{- $tables := dict
  "gpu-operator" (dict "label" "nvidia.com/gpu.product" "h100" "NVIDIA-H100-80GB-HBM3" "h100-pcie" "NVIDIA-H100-PCIe" "h200" "NVIDIA-H200" "a100" "NVIDIA-A100-SXM4-80GB")
  "gke" (dict "label" "cloud.google.com/gke-accelerator" "h100" "nvidia-h100-80gb" "h100-pcie" "nvidia-h100-80gb" "h200" "nvidia-h200-141gb" "a100" "nvidia-a100-80gb") }}
{{- $t := get $tables $w.gpuLabels }}
{{- with get $t .gpuType }}{{ get $t "label" }}: {{ . }}{{ end }}
{{- end }}
{{- end }}

{{/*
The Kueue API version this cluster serves: v1beta2 from Kueue 0.15, else v1beta1 (served by 0.13 to 0.19).
`helm template` without a cluster sees no Kueue: pass --api-versions kueue.x-k8s.io/v1beta2 to choose.
*/}}
{{- define "llmctl.kueueAPI" -}}
{{- if .Capabilities.APIVersions.Has "kueue.x-k8s.io/v1beta2" }}kueue.x-k8s.io/v1beta2{{ else }}kueue.x-k8s.io/v1beta1{{ end }}
{{- end }}

{{/*
The Kueue WorkloadPriorityClass of runs on a queue: config.kueue.priorityClass, else the chart's production class
when it creates it (templates/workloadpriorityclass.yaml), else none.
*/}}
{{- define "llmctl.runPriorityClass" -}}
{{- if .Values.config.kueue.priorityClass }}
{{- .Values.config.kueue.priorityClass }}
{{- else if .Values.kueue.priorityClasses.create }}llmctl-production
{{- end }}
{{- end }}

{{/*
A "<n>Gi" quantity as the integer n (the schema allows only that form for the sizes summed here).
*/}}
{{- define "llmctl.gi" -}}
{{- trimSuffix "Gi" (toString .) | int }}
{{- end }}

{{/*
Whether the warm cluster gets Ray token authentication: rayAuth token, a known KubeRay >= 1.5.1 (the chart
cannot read the operator's release; config.kuberay.version says it) and Ray >= 2.52.
*/}}
{{- define "llmctl.rayAuth" -}}
{{- $cfg := .Values.config }}
{{- if and (eq $cfg.rayAuth "token") $cfg.kuberay.version (semverCompare ">=1.5.1-0" $cfg.kuberay.version) (semverCompare ">=2.52.0-0" $cfg.rayVersion) }}true{{ end }}
{{- end }}

{{/*
Fail early, naming the key and the value, for combinations the schema cannot express.
*/}}
{{- define "llmctl.validate" -}}
{{- $pc := .Values.kueue.priorityClasses }}
{{- if and $pc.create (ge (int64 $pc.sweep) (int64 $pc.production)) }}
{{- fail (printf "kueue.priorityClasses.sweep (%d) must be below kueue.priorityClasses.production (%d): sweep cells queue behind runs" (int64 $pc.sweep) (int64 $pc.production)) }}
{{- end }}
{{- if and $pc.create (eq (include "llmctl.runPriorityClass" .) .Values.config.kueue.sweepPriorityClass) }}
{{- fail (printf "config.kueue.priorityClass and config.kueue.sweepPriorityClass are both %q: runs and sweep cells need two WorkloadPriorityClasses" .Values.config.kueue.sweepPriorityClass) }}
{{- end }}
{{- if not (contains "://" .Values.config.storageRoot) }}
{{- fail (printf "config.storageRoot must be a URL every pod can reach, such as s3://bucket/prefix; got %q" .Values.config.storageRoot) }}
{{- end }}
{{- range $key, $v := dict "config.storageRoot" .Values.config.storageRoot "config.s3.endpoint" .Values.config.s3.endpoint }}
{{- if regexMatch "^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@" (toString $v) }}
{{- fail (printf "%s holds a URL with a user:password part; pass credentials by reference (config.s3.credentialsSecret)" $key) }}
{{- end }}
{{- end }}
{{- if not (regexMatch "^(s3|s3a|gs|gcs|az|abfs|abfss|hf)://" .Values.config.storageRoot) }}
{{- fail (printf "config.storageRoot %q is node-local; runs need shared storage (s3://, gs://, az://, abfs://, hf://)" .Values.config.storageRoot) }}
{{- end }}
{{- if .Values.rayCluster.enabled }}
{{- if gt (int .Values.rayCluster.gpusPerWorker) (int .Values.config.workers.gpusPerNode) }}
{{- fail (printf "rayCluster.gpusPerWorker (%d) cannot exceed config.workers.gpusPerNode (%d)" (int .Values.rayCluster.gpusPerWorker) (int .Values.config.workers.gpusPerNode)) }}
{{- end }}
{{- if and .Values.rayCluster.autoscaling.enabled (gt (int .Values.rayCluster.autoscaling.minReplicas) (int .Values.rayCluster.autoscaling.maxReplicas)) }}
{{- fail (printf "rayCluster.autoscaling.minReplicas (%d) is above maxReplicas (%d)" (int .Values.rayCluster.autoscaling.minReplicas) (int .Values.rayCluster.autoscaling.maxReplicas)) }}
{{- end }}
{{- end }}
{{- if and .Values.kueue.clusterQueue.create (not (regexMatch "^[0-9]+Gi$" (toString .Values.config.head.memory))) }}
{{- fail (printf "config.head.memory must be whole Gi (e.g. 32Gi) when kueue.clusterQueue.create sizes quota from it; got %q" (toString .Values.config.head.memory)) }}
{{- end }}
{{- /* the same rules as llmctl's (cli/kube/config.py, trainer/plan/credentials.py): no credentials by name or
by value, and nothing llmctl sets itself */ -}}
{{- range $k, $v := .Values.config.env }}
{{- if regexMatch "(?i)(KEY|TOKEN|SECRET|PASS|PWD|AUTH|CREDENTIAL|PRIVATE|CERT|COOKIE|SESSION)" $k }}
{{- fail (printf "config.env.%s looks like a credential; put it in a Secret and set config.s3.credentialsSecret" $k) }}
{{- end }}
{{- if regexMatch "^(HOME|TMPDIR|RAY_TMPDIR|PATH|PYTHONPATH|PYTHONHOME|PYTHONSTARTUP|LD_PRELOAD|LD_LIBRARY_PATH|LLMCTL_.*|AWS_.*|RAY_AUTH_.*|KUBERNETES_.*)$" $k }}
{{- fail (printf "config.env.%s is set by llmctl (or decides what code runs) and cannot be replaced" $k) }}
{{- end }}
{{- if regexMatch "(AKIA|ASIA)[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_|hf_[A-Za-z0-9]{30,}|xox[abposr]-|-----BEGIN|eyJ[A-Za-z0-9_-]{8,}\\.eyJ|://[^/?#]*@" (toString $v) }}
{{- fail (printf "config.env.%s: its value looks like a credential; put it in a Secret and set config.s3.credentialsSecret" $k) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Environment of Ray containers in the warm cluster (the per-run RayJob adds LLMCTL_RUN itself).
*/}}
{{- define "llmctl.rayEnv" -}}
- name: HOME
  value: /tmp
- name: LLMCTL_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: LLMCTL_NODE
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: NCCL_DEBUG
  value: WARN
{{- with .Values.config.s3.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.config.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
{{- end }}
{{- range $k, $v := .Values.config.env }}
- name: {{ $k }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- end }}
