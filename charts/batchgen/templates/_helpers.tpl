{{/*
Names and labels. Kubernetes object names and label values are limited to 63 characters (DNS-1123 label), so
every name is truncated here, once, and suffixed names reserve room for their suffix instead of being cut
through it.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "batchgen.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
"<release>-<chart>", or fullnameOverride; just the release name when it already contains the chart name.
*/}}
{{- define "batchgen.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
"<fullname>-<suffix>" within 63 characters: the fullname is shortened, the suffix kept whole.
Usage: include "batchgen.componentName" (list . "controller")
*/}}
{{- define "batchgen.componentName" -}}
{{- $root := index . 0 -}}
{{- $suffix := index . 1 -}}
{{- $base := include "batchgen.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" -}}
{{- printf "%s-%s" $base $suffix -}}
{{- end -}}

{{/* "chart-version" for the helm.sh/chart label; '+' is not allowed in label values. */}}
{{- define "batchgen.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "batchgen.labels" -}}
helm.sh/chart: {{ include "batchgen.chart" . }}
{{ include "batchgen.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: batchgen
{{- end -}}

{{/* The subset that identifies this release's objects (stable across upgrades). */}}
{{- define "batchgen.selectorLabels" -}}
app.kubernetes.io/name: {{ include "batchgen.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{/* The controller's ServiceAccount: the chart's own, or an existing one named in serviceAccount.name. */}}
{{- define "batchgen.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "batchgen.fullname" .) .Values.serviceAccount.name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
The workers' ServiceAccount. The chart's worker account has no Role bound (workers only need S3), and carries the
same annotations so workload identity (IRSA, GKE) reaches the workers too.
*/}}
{{- define "batchgen.workerServiceAccountName" -}}
{{- if .Values.workers.serviceAccount.create -}}
{{- default (include "batchgen.componentName" (list . "worker")) .Values.workers.serviceAccount.name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- .Values.workers.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* "repository:tag", the tag defaulting to the chart's appVersion. */}}
{{- define "batchgen.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Name of the TrainingRuntime the release's TrainJobs reference (trainer.runtime.name, or "<fullname>-runtime"). */}}
{{- define "batchgen.runtimeName" -}}
{{- default (include "batchgen.componentName" (list . "runtime")) .Values.trainer.runtime.name -}}
{{- end -}}

{{/* Name of the run-config ConfigMap. */}}
{{- define "batchgen.configMapName" -}}
{{- include "batchgen.componentName" (list . "config") -}}
{{- end -}}

{{/*
S3 settings as environment variables. Credentials only ever as secretKeyRef to an existing Secret; with no Secret
the SDK's chain applies (workload identity through the ServiceAccount annotations, or the node's role).
*/}}
{{- define "batchgen.s3Env" -}}
{{- with .Values.s3.endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.region }}
- name: AWS_REGION
  value: {{ . | quote }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- with .Values.s3.credentialsSecret }}
{{- if .name }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .secretAccessKeyKey }}
{{- if .sessionTokenKey }}
- name: AWS_SESSION_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .sessionTokenKey }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Container hardening shared by every container of the chart. */}}
{{- define "batchgen.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "batchgen.manifestMounts" -}}
{{- if .Values.run.manifestVolume }}
- name: manifests
  mountPath: /manifests
  readOnly: true
{{- end }}
{{- end -}}

{{- define "batchgen.manifestVolumes" -}}
{{- if .Values.run.manifestVolume }}
- name: manifests
  persistentVolumeClaim:
    claimName: {{ .Values.run.manifestVolume }}
    readOnly: true
{{- end }}
{{- end -}}

{{/*
Where the workers see the weights: model.dir, else /models/<family> (LaunchSettings' default).
*/}}
{{- define "batchgen.modelDir" -}}
{{- .Values.model.dir | default (printf "/models/%s" .Values.model.family) -}}
{{- end }}
