{{/* The gateway's Batch API storage (values: batches): its environment, volume mount and volume. */}}
{{- define "genembed.batchesEnv" -}}
{{- $b := .Values.batches -}}
- name: GENEMBED_BATCH_MAX_IN_FLIGHT
  value: {{ $b.maxInFlight | quote }}
{{- if $b.s3.bucket }}
- name: GENEMBED_BATCH_S3_BUCKET
  value: {{ $b.s3.bucket | quote }}
- name: GENEMBED_BATCH_S3_PREFIX
  value: {{ $b.s3.prefix | quote }}
{{- with $b.s3.endpointUrl }}
- name: GENEMBED_BATCH_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with $b.s3.region }}
- name: GENEMBED_BATCH_S3_REGION
  value: {{ . | quote }}
{{- end }}
{{- with $b.s3.existingSecret }}
- name: GENEMBED_BATCH_S3_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: access-key-id
- name: GENEMBED_BATCH_S3_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: secret-access-key
{{- end }}
{{- else }}
- name: GENEMBED_BATCH_DIR
  value: /var/lib/genembed/batches
{{- end }}
{{- end }}

{{- define "genembed.batchesVolumeMount" -}}
{{- if not .Values.batches.s3.bucket -}}
- name: batches
  mountPath: /var/lib/genembed/batches
{{- end }}
{{- end }}

{{- define "genembed.batchesVolume" -}}
{{- $b := .Values.batches -}}
{{- if not $b.s3.bucket -}}
- name: batches
{{- if $b.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ $b.persistence.existingClaim | default (printf "%s-batches" (include "genembed.fullname" .)) }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
{{- end }}
