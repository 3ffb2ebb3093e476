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

{{- define "pdserve.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "pdserve.fullname" .) -}}
{{- else -}}
{{- required "set cluster.redis_url, or redis.enabled: true (worker pods cannot reach a private redis-server on the head)" .Values.cluster.redis_url -}}
{{- end -}}
{{- end -}}

{{/* The ClusterConfig the head runs: values.cluster with the router on all interfaces and the chart's Redis. */}}
{{- define "pdserve.clusterConfig" -}}
{{- $cluster := deepCopy .Values.cluster -}}
{{- $_ := set $cluster "host" "0.0.0.0" -}}
{{- $_ := set $cluster "redis_url" (include "pdserve.redisUrl" .) -}}
{{- toYaml $cluster -}}
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
{{- with .Values.security.secretName }}
- name: PDSERVE_API_KEY
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: api-key, optional: true}
- name: PDSERVE_CLUSTER_SECRET
  valueFrom:
    secretKeyRef: {name: {{ . }}, key: cluster-secret, optional: true}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
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
{{- end -}}

{{- define "pdserve.volumeMounts" -}}
- {name: dshm, mountPath: /dev/shm}
- {name: config, mountPath: /etc/pdserve, readOnly: true}
{{- if or .Values.model.persistentVolumeClaim .Values.model.hostPath }}
- {name: models, mountPath: {{ .Values.model.mountPath }}, readOnly: true}
{{- end }}
{{- end -}}
