{{- define "fedgate.labels" -}}
app.kubernetes.io/name: fedgate
{{- end }}
{{- define "fedgate.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}
{{- /* Fails when terminationGracePeriodSeconds leaves the drain no time: it must exceed
   preStopSleepSeconds + traffic.drainDuration (default 45s). Checked when drainDuration is
   whole seconds or minutes ("90s", "2m"); other forms are left to the operator. */ -}}
{{- define "fedgate.checkGracePeriod" -}}
{{- $drain := 45 -}}
{{- $d := toString (dig "drainDuration" "" (.Values.traffic | default dict)) -}}
{{- if regexMatch "^[0-9]+s$" $d -}}
{{- $drain = trimSuffix "s" $d | atoi -}}
{{- else if regexMatch "^[0-9]+m$" $d -}}
{{- $drain = mul (trimSuffix "m" $d | atoi) 60 -}}
{{- else if ne $d "" -}}
{{- $drain = -1 -}}
{{- end -}}
{{- $need := add $drain (int .Values.preStopSleepSeconds) -}}
{{- if and (ge $drain 0) (le (int .Values.terminationGracePeriodSeconds) $need) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + traffic.drainDuration (%d s), or the kubelet kills the gateway before its drain ends" (int .Values.terminationGracePeriodSeconds) $need) -}}
{{- end -}}
{{- end }}
