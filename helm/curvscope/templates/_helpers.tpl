{{/* Names and labels. */}}
{{- define "curvscope.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "curvscope.fullname" -}}
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

{{- define "curvscope.selectorLabels" -}}
app.kubernetes.io/name: {{ include "curvscope.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "curvscope.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "curvscope.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: server
{{- end }}

{{- define "curvscope.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "curvscope.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "curvscope.image" -}}
{{- $variant := ternary .Values.image.variant "cpu" .Values.gpu.enabled }}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion $variant) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "curvscope.tokenSecret" -}}
{{- default (printf "%s-tokens" (include "curvscope.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "curvscope.tlsSecret" -}}
{{- default (printf "%s-tls" (include "curvscope.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{- define "curvscope.claimName" -}}
{{- default (printf "%s-store" (include "curvscope.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/* More than one pod at a time shares the store. */}}
{{- define "curvscope.multiReplica" -}}
{{- if or (gt (int .Values.replicaCount) 1) (and .Values.autoscaling.enabled (gt (int .Values.autoscaling.maxReplicas) 1)) }}true{{- end }}
{{- end }}

{{/*
A probe. Without TLS: the kubelet's own gRPC probe on a health service. With TLS (which the
kubelet's gRPC probe cannot speak): the same health check from Python inside the container,
trusting ca.crt and presenting the server's own certificate when mutual TLS is on.
*/}}
{{- define "curvscope.probe" -}}
{{- $root := index . 0 }}
{{- $service := index . 1 }}
{{- if $root.Values.tls.enabled }}
exec:
  command:
    - python
    - -c
    - |
      import sys, grpc
      from grpc_health.v1 import health_pb2, health_pb2_grpc
      def read(name):
          with open("/etc/curvscope/tls/" + name, "rb") as handle:
              return handle.read()
      mutual = {{ ternary "True" "False" $root.Values.tls.mutual }}
      credentials = grpc.ssl_channel_credentials(
          read("ca.crt"), read("tls.key") if mutual else None, read("tls.crt") if mutual else None)
      channel = grpc.secure_channel("localhost:{{ $root.Values.server.port }}", credentials,
                                    options=[("grpc.ssl_target_name_override", sys.argv[2])])
      status = health_pb2_grpc.HealthStub(channel).Check(
          health_pb2.HealthCheckRequest(service=sys.argv[1]), timeout=4).status
      sys.exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)
    - {{ $service | quote }}
    - {{ default (printf "%s.%s.svc" (include "curvscope.fullname" $root) $root.Release.Namespace) $root.Values.tls.serverName | quote }}
{{- else }}
grpc:
  port: {{ $root.Values.server.port }}
  service: {{ $service | quote }}
{{- end }}
{{- end }}
