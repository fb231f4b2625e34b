{{/* Chart name. */}}
{{- define "embedjob.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart> unless the release name already contains the chart name. */}}
{{- define "embedjob.fullname" -}}
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

{{- define "embedjob.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embedjob.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "embedjob.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "embedjob.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "embedjob.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "embedjob.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Namespaces the operator watches (a JSON list); empty in cluster-wide mode. */}}
{{- define "embedjob.watchNamespaces" -}}
{{- if .Values.watch.clusterWide }}
{{- list | toJson }}
{{- else if .Values.watch.namespaces }}
{{- .Values.watch.namespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{- define "embedjob.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "embedjob.workerImage" -}}
{{- printf "%s:%s" .Values.worker.image.repository (default .Chart.AppVersion .Values.worker.image.tag) }}
{{- end }}

{{- define "embedjob.workerServiceAccountName" -}}
{{- if .Values.worker.serviceAccount.create }}
{{- default (printf "%s-worker" (include "embedjob.fullname" .)) .Values.worker.serviceAccount.name }}
{{- else }}
{{- .Values.worker.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator's config file (embedjob/operator/config.py: OperatorSettings). Empty
values are left out so that the operator's own defaults (None) apply.
*/}}
{{- define "embedjob.config" -}}
{{- $w := .Values.worker }}
{{- $storage := dict }}
{{- range $key := list "endpointUrl" "region" "credentialsSecret" }}
{{- with index $w.storage $key }}{{ $_ := set $storage $key . }}{{ end }}
{{- end }}
{{- $defaults := dict "nodeSelector" $w.nodeSelector "tolerations" $w.tolerations "env" $w.env "terminationGracePeriodSeconds" $w.terminationGracePeriodSeconds "storage" $storage }}
{{- with $w.resources }}{{ $_ := set $defaults "resources" . }}{{ end }}
{{- with $w.affinity }}{{ $_ := set $defaults "affinity" . }}{{ end }}
{{- with $w.priorityClassName }}{{ $_ := set $defaults "priorityClassName" . }}{{ end }}
{{- with include "embedjob.workerServiceAccountName" . }}{{ $_ := set $defaults "serviceAccountName" . }}{{ end }}
{{- $_ := set $defaults "cacheSizeLimit" $w.cacheSizeLimit }}
{{- $_ := set $defaults "ephemeralStorage" ($w.ephemeralStorage | default nil) }}
{{- $s := .Values.steps }}
{{- $steps := dict "nodeSelector" $s.nodeSelector "tolerations" $s.tolerations }}
{{- with $s.affinity }}{{ $_ := set $steps "affinity" . }}{{ end }}
{{- with $s.priorityClassName }}{{ $_ := set $steps "priorityClassName" . }}{{ end }}
{{- $o := .Values.operator }}
{{- $config := dict "workerImage" (include "embedjob.workerImage" .) "namespaces" (include "embedjob.watchNamespaces" . | fromJsonArray) "metricsPort" .Values.metrics.port "livenessPort" $o.livenessPort "statusIntervalSeconds" $o.statusIntervalSeconds "progressPollSeconds" $o.progressPollSeconds "storageRequestsPerMinute" $o.storageRequestsPerMinute "stuckAfterSeconds" $o.stuckAfterSeconds "unschedulableAfterSeconds" $o.unschedulableAfterSeconds "waitDeadlines" $o.waitDeadlines "waitEventIntervalSeconds" $o.waitEventIntervalSeconds "createChunk" $o.createChunk "workerDefaults" $defaults "indexResources" $s.indexResources "finalizeResources" $s.finalizeResources "stepPods" $steps "security" .Values.security }}
{{- toYaml $config }}
{{- end }}

{{/*
RBAC rules: exactly what the operator calls (embedjob/operator/rbac.py REQUIRED_RULES;
tests/integration/test_chart.py asserts equality). No wildcards. Secrets: get only (by the
name a job gives in spec.storage.credentialsSecret, to read its output with its identity).
*/}}
{{- define "embedjob.rules" -}}
- apiGroups: ["embedjob.io"]
  resources: ["embeddingjobs"]
  verbs: ["list", "watch", "patch", "delete"]
- apiGroups: ["embedjob.io"]
  resources: ["embeddingjobs/status"]
  verbs: ["patch"]
- apiGroups: ["embedjob.io"]
  resources: ["embeddingjobs/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
