{{/* Chart name, release-qualified name (<= 63 chars), labels. */}}
{{- define "pdserve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pdserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "pdserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{/* The Ray head's in-cluster DNS name (its Service), which worker pods join. */}}
{{- define "pdserve.headHost" -}}
{{- printf "%s-head" (include "pdserve.fullname" .) -}}
{{- end -}}

{{/* Where the pods find the Secrets' files (own folders: a mount inside the ConfigMap's /etc/pdserve would
write into that volume). */}}
{{- define "pdserve.credentialsDir" -}}/etc/pdserve-credentials{{- end -}}
{{- define "pdserve.tlsDir" -}}/etc/pdserve-tls{{- end -}}
{{- define "pdserve.redisTlsDir" -}}/etc/pdserve-redis-tls{{- end -}}

{{/* The Secret holding the Redis password ("" if none: an external Redis whose URL carries it, or has none). */}}
{{- define "pdserve.redisPasswordSecret" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecret -}}
{{- else if .Values.redis.enabled -}}
{{- printf "%s-redis" (include "pdserve.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "pdserve.redisPasswordKey" -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- .Values.redis.auth.existingSecretPasswordKey -}}
{{- else -}}
redis-password
{{- end -}}
{{- end -}}

{{/* redis-server's flags for TLS only (the chart's Redis with redis.tls): clients prove themselves by password. */}}
{{- define "pdserve.redisTlsArgs" -}}
{{- if .Values.redis.tls.existingSecret }} --port 0 --tls-port 6379 --tls-cert-file /tls/tls.crt --tls-key-file /tls/tls.key --tls-ca-cert-file /tls/ca.crt --tls-auth-clients no
{{- end -}}
{{- end -}}

{{- define "pdserve.redisUrl" -}}
{{- if and .Values.redis.enabled .Values.redis.tls.existingSecret -}}
{{- printf "rediss://%s-redis:6379/0?ssl_ca_certs=%s/ca.crt" (include "pdserve.fullname" .) (include "pdserve.redisTlsDir" .) -}}
{{- else if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "pdserve.fullname" .) -}}
{{- else -}}
{{- required "set cluster.redis_url, or redis.enabled: true (worker pods cannot reach a private redis-server on the head)" .Values.cluster.redis_url -}}
{{- end -}}
{{- end -}}

{{/* The ClusterConfig the head runs: values.cluster with the router on all interfaces, the chart's Redis and,
with security.tls, the TLS files. */}}
{{- define "pdserve.clusterConfig" -}}
{{- $cluster := deepCopy .Values.cluster -}}
{{- $_ := set $cluster "host" "0.0.0.0" -}}
{{- $_ := set $cluster "redis_url" (include "pdserve.redisUrl" .) -}}
{{- with .Values.security.tls -}}
{{- if .existingSecret -}}
{{- $_ := set $cluster "tls_cert" (printf "%s/tls.crt" (include "pdserve.tlsDir" $)) -}}
{{- $_ := set $cluster "tls_key" (printf "%s/tls.key" (include "pdserve.tlsDir" $)) -}}
{{- if .clientCA -}}
{{- $_ := set $cluster "tls_client_ca" (printf "%s/ca.crt" (include "pdserve.tlsDir" $)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toYaml $cluster -}}
{{- end -}}

{{/* Whether the head passes --api-key-file (the API keys' file from security.existingSecret). */}}
{{- define "pdserve.apiKeys" -}}
{{- if and .Values.security.existingSecret .Values.security.apiKeysKey -}}true{{- end -}}
{{- end -}}

{{/* How many workers (one GPU each) the cluster runs: prefill + decode, or in colocated mode `colocated`
(default prefill + decode), as ClusterConfig.worker_roles() counts them. */}}
{{- define "pdserve.numWorkers" -}}
{{- $c := .Values.cluster -}}
{{- if and (eq (toString $c.mode) "colocated") (not (kindIs "invalid" $c.colocated)) -}}
{{- $c.colocated -}}
{{- else -}}
{{- add $c.prefill $c.decode -}}
{{- end -}}
{{- end -}}

{{/* Workers per GPU: floor(1 / cluster.gpus_per_worker), as ClusterConfig.num_gpus() counts them. */}}
{{- define "pdserve.workersPerGpu" -}}
{{- int (floor (addf (divf 1.0 (.Values.cluster.gpus_per_worker | default 1.0)) 0.000000001)) -}}
{{- end -}}

{{/* Whole GPUs the workers occupy (ClusterConfig.num_gpus()). */}}
{{- define "pdserve.numGpus" -}}
{{- $per := int (include "pdserve.workersPerGpu" .) -}}
{{- div (add (int (include "pdserve.numWorkers" .)) $per -1) $per -}}
{{- end -}}

{{- define "pdserve.workerReplicas" -}}
{{- if kindIs "invalid" .Values.worker.replicas -}}
{{- $gpus := int .Values.worker.gpusPerPod -}}
{{- div (add (int (include "pdserve.numGpus" .)) $gpus -1) $gpus -}}
{{- else -}}
{{- .Values.worker.replicas -}}
{{- end -}}
{{- end -}}

{{/* Pod env shared by head and workers: the pod IP as the Ray node's address, Ray's auth mode. */}}
{{- define "pdserve.rayEnv" -}}
- name: POD_IP
  valueFrom:
    fieldRef: {fieldPath: status.podIP}
- name: RAY_AUTH_MODE      # cluster-internal traffic; restrict it with a NetworkPolicy
  value: disabled
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The head's credentials in its environment (the launcher hands them on inside the configs it sends). */}}
{{- define "pdserve.headSecretEnv" -}}
{{- if and .Values.security.existingSecret .Values.security.clusterSecretKey }}
- name: PDSERVE_CLUSTER_SECRET
  valueFrom:
    secretKeyRef: {name: {{ .Values.security.existingSecret }}, key: {{ .Values.security.clusterSecretKey }}, optional: true}
{{- end }}
{{- with include "pdserve.redisPasswordSecret" . }}
- name: PDSERVE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: {{ include "pdserve.redisPasswordKey" $ }}}
{{- end }}
{{- end -}}

{{/* Volumes shared by head and workers: /dev/shm, the cluster config and the model volume. */}}
{{- define "pdserve.volumes" -}}
- name: dshm
  emptyDir: {medium: Memory, sizeLimit: {{ .Values.shmSize }}}
- name: config
  configMap:
    name: {{ include "pdserve.fullname" . }}
    defaultMode: 0755
{{- if .Values.model.persistentVolumeClaim }}
- name: models
  persistentVolumeClaim: {claimName: {{ .Values.model.persistentVolumeClaim }}, readOnly: true}
{{- else if .Values.model.hostPath }}
- name: models
  hostPath: {path: {{ .Values.model.hostPath }}, type: Directory}
{{- end }}
{{- with .Values.redis.tls.existingSecret }}
- name: redis-tls
  secret:
    secretName: {{ . }}
    items: [{key: ca.crt, path: ca.crt}]   # every pod's workers connect to Redis; the key stays with Redis
{{- end }}
{{- end -}}

{{- define "pdserve.volumeMounts" -}}
- {name: dshm, mountPath: /dev/shm}
- {name: config, mountPath: /etc/pdserve, readOnly: true}
{{- if or .Values.model.persistentVolumeClaim .Values.model.hostPath }}
- {name: models, mountPath: {{ .Values.model.mountPath }}, readOnly: true}
{{- end }}
{{- if .Values.redis.tls.existingSecret }}
- {name: redis-tls, mountPath: {{ include "pdserve.redisTlsDir" . }}, readOnly: true}
{{- end }}
{{- end -}}

{{/* The head's own volumes besides those: the API keys' file and the router's TLS material. */}}
{{- define "pdserve.headSecretVolumes" -}}
{{- if include "pdserve.apiKeys" . }}
- name: credentials
  secret:
    secretName: {{ .Values.security.existingSecret }}
    items: [{key: {{ .Values.security.apiKeysKey }}, path: api-keys}]
{{- end }}
{{- with .Values.security.tls.existingSecret }}
- name: tls
  secret: {secretName: {{ . }}}
{{- end }}
{{- end -}}

{{- define "pdserve.headSecretVolumeMounts" -}}
{{- if include "pdserve.apiKeys" . }}
- {name: credentials, mountPath: {{ include "pdserve.credentialsDir" . }}, readOnly: true}
{{- end }}
{{- if .Values.security.tls.existingSecret }}
- {name: tls, mountPath: {{ include "pdserve.tlsDir" . }}, readOnly: true}
{{- end }}
{{- end -}}

{{/* The router's health, as the head's startup and readiness probes ask it: gRPC health; with TLS (which
the kubelet's gRPC probe cannot speak) GET /health over HTTPS (the kubelet does not check the certificate);
with mutual TLS (the kubelet has no client certificate) only that the gRPC port accepts connections. */}}
{{- define "pdserve.routerHealthProbe" -}}
{{- if not .Values.security.tls.existingSecret -}}
grpc: {port: {{ .Values.cluster.port }}}
{{- else if .Values.security.tls.clientCA -}}
tcpSocket: {port: grpc}
{{- else -}}
{{- if not .Values.cluster.http_port }}{{ fail "security.tls needs cluster.http_port: the head's probes ask /health over HTTPS" }}{{ end -}}
httpGet: {path: /health, port: http, scheme: HTTPS}
{{- end -}}
{{- end -}}
