{{/* Who may call whom (docs/deploy.md#who-trusts-whom): the shared secrets and the Redis URL built from them. */}}

{{/* The Secret the chart generates for what its pods share: the workers' token and Redis's password. */}}
{{- define "genembed.internalSecret" -}}
{{- printf "%s-internal" (include "genembed.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "genembed.workerTokenSecret" -}}
{{- .Values.workerAuth.existingSecret | default (include "genembed.internalSecret" .) }}
{{- end }}

{{- define "genembed.redisPasswordSecret" -}}
{{- .Values.redis.auth.existingSecret | default (include "genembed.internalSecret" .) }}
{{- end }}

{{/* The chart's Redis: rediss:// checked against the CA of redis.tls.existingSecret when TLS is on. The password
comes separately (GENEMBED_REDIS_PASSWORD from the Secret): nothing secret is in this URL. */}}
{{- define "genembed.redisUrl" -}}
{{- if .Values.redis.tls.enabled }}
{{- printf "rediss://%s-redis:6379/0?ssl_ca_certs=/etc/genembed/redis-tls/ca.crt" (include "genembed.fullname" .) }}
{{- else }}
{{- printf "redis://%s-redis:6379/0" (include "genembed.fullname" .) }}
{{- end }}
{{- end }}

{{/* GENEMBED_WORKER_TOKEN: the gateway sends it, the workers require it (the same variable for both). */}}
{{- define "genembed.workerTokenEnv" -}}
- name: GENEMBED_WORKER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "genembed.workerTokenSecret" . }}
      key: worker-token
{{- end }}

{{/* What restarts pods when a value they read from a Secret changes (values only: a Secret of yours that
changes needs `kubectl rollout restart`). */}}
{{- define "genembed.workerAuthChecksum" -}}
{{- toJson .Values.workerAuth | sha256sum }}
{{- end }}

{{- define "genembed.redisAuthChecksum" -}}
{{- toJson (dict "auth" .Values.redis.auth "tls" .Values.redis.tls) | sha256sum }}
{{- end }}
