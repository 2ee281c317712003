{{- define "fedgate.labels" -}}
app.kubernetes.io/name: fedgate
{{- end }}
{{- define "fedgate.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
