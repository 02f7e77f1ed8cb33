{{/* Names and labels. */}}
{{- define "genembed.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "genembed.fullname" -}}
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

{{- define "genembed.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "genembed.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "genembed.selectorLabels" -}}
app.kubernetes.io/name: {{ include "genembed.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "genembed.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "genembed.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* A worker's resource name, from (dict "root" $ "name" $w.name). */}}
{{- define "genembed.workerName" -}}
{{- printf "%s-worker-%s" (include "genembed.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The model id a worker serves: its spec's id, else the built-in id. */}}
{{- define "genembed.workerModelId" -}}
{{- if .spec }}{{ .spec.id }}{{ else }}{{ .model }}{{ end }}
{{- end }}

{{/* The judge's chat-completions base URL: the chart's vLLM, else judge.externalUrl (may be empty). */}}
{{- define "genembed.judgeUrl" -}}
{{- if .Values.judge.enabled }}
{{- printf "http://%s-judge:%d/v1" (include "genembed.fullname" .) (int .Values.judge.port) }}
{{- else }}
{{- .Values.judge.externalUrl }}
{{- end }}
{{- end }}

{{/* The preStop hook that keeps a pod serving while endpoints and DNS forget it. */}}
{{- define "genembed.preStop" -}}
lifecycle:
  preStop:
    exec:
      command: ["sleep", "{{ . }}"]
{{- end }}
