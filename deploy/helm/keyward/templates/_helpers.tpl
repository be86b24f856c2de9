{{/* Names and labels shared by every template. */}}

{{- define "keyward.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release name, or <release>-keyward when it does not contain "keyward". */}}
{{- define "keyward.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 58 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 58 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "keyward.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keyward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "keyward.labels" -}}
{{ include "keyward.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "keyward.postgres" -}}
{{- if eq .Values.store.engine "postgres" }}true{{ end -}}
{{- end -}}

{{/* The Secret holding a token: the chart's own when `value` is set, else existingSecret. */}}
{{- define "keyward.tokenSecret" -}}
{{- $token := index .root.Values.tokens .which -}}
{{- if $token.value -}}
{{- printf "%s-%s-token" (include "keyward.fullname" .root) .which -}}
{{- else -}}
{{- required (printf "tokens.%s: set existingSecret (a Secret you created) or value" .which) $token.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "keyward.tokenKey" -}}
{{- $token := index .root.Values.tokens .which -}}
{{- if $token.value }}token{{ else }}{{ $token.key }}{{ end -}}
{{- end -}}

{{- define "keyward.scheme" -}}
{{- if .Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end -}}
{{- end -}}
