{{/*
specdec-sidecar.name: the chart name, or nameOverride; truncated to 63 characters (DNS label limit).
*/}}
{{- define "specdec-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
specdec-sidecar.fullname: the name of every resource: fullnameOverride, else "<release>-<chart name>"
(just the release name when it already contains the chart name); truncated to 63 characters.
*/}}
{{- define "specdec-sidecar.fullname" -}}
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

{{/*
specdec-sidecar.chart: "<chart>-<version>" for the helm.sh/chart label.
*/}}
{{- define "specdec-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
specdec-sidecar.labels: the standard labels every resource carries (selector labels included).
*/}}
{{- define "specdec-sidecar.labels" -}}
helm.sh/chart: {{ include "specdec-sidecar.chart" . }}
{{ include "specdec-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
specdec-sidecar.selectorLabels: the immutable labels the Deployment, Service and monitors select pods by.
*/}}
{{- define "specdec-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "specdec-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
specdec-sidecar.arm: which arm of the baseline comparison (docs/baseline.md) a Deployment render is:
"baseline" when templates/baseline-deployment.yaml renders deployment.yaml with `arm` set in its context,
else "speculative".
*/}}
{{- define "specdec-sidecar.arm" -}}
{{- default "speculative" .arm }}
{{- end }}

{{/*
specdec-sidecar.armName: the Deployment's name: fullname, with "-baseline" for the baseline arm.
*/}}
{{- define "specdec-sidecar.armName" -}}
{{- if eq (include "specdec-sidecar.arm" .) "baseline" }}
{{- printf "%s-baseline" (include "specdec-sidecar.fullname" . | trunc 54 | trimSuffix "-") }}
{{- else }}
{{- include "specdec-sidecar.fullname" . }}
{{- end }}
{{- end }}

{{/*
specdec-sidecar.armLabel: the arm label on both Deployments' pods. With baseline.enabled it is also in each
Deployment's selector, so the two select disjoint pods (the Service and the monitors select by
selectorLabels, both arms). Adding it to a selector is an immutable change: see docs/baseline.md.
*/}}
{{- define "specdec-sidecar.armLabel" -}}
specdec-sidecar/arm: {{ include "specdec-sidecar.arm" . }}
{{- end }}

{{/*
specdec-sidecar.serviceAccountName: the ServiceAccount the pod runs as.
*/}}
{{- define "specdec-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "specdec-sidecar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
specdec-sidecar.sidecarImage: "<repository>:<tag>", the tag defaulting to the chart's appVersion.
*/}}
{{- define "specdec-sidecar.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (default .Chart.AppVersion .Values.sidecar.image.tag) }}
{{- end }}

{{/*
specdec-sidecar.settingValue: one sidecar setting as its flag value: lists joined by commas, numbers
printed without exponent noise, strings as they are.
*/}}
{{- define "specdec-sidecar.settingValue" -}}
{{- if kindIs "slice" . }}
{{- $items := list }}
{{- range . }}{{- $items = append $items (toString .) }}{{- end }}
{{- join "," $items }}
{{- else if kindIs "float64" . }}
{{- if eq . (floor .) }}{{- printf "%d" (int64 .) }}{{- else }}{{- toString . }}{{- end }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
specdec-sidecar.sidecarArgs: the `specdec-sidecar serve` arguments as a YAML list. Addresses come from the
chart (upstream = vLLM on localhost, proxy on sidecar.proxyPort, metrics on sidecar.metricsPort); every
non-null key of sidecar.settings becomes --kebab-case-flag=value; empty lists are left out (the sidecar's
default applies); with vllm.apiKeySecret, --upstream-api-key-file points at that Secret, mounted (the key
itself never appears in the pod spec). tests/test_helm.py parses the result with the sidecar's own argument parser.
*/}}
{{- define "specdec-sidecar.sidecarArgs" -}}
- serve
- --upstream=http://127.0.0.1:{{ .Values.vllm.port }}
- --proxy-host=0.0.0.0
- --proxy-port={{ .Values.sidecar.proxyPort }}
- --metrics-host=0.0.0.0
- --metrics-port={{ .Values.sidecar.metricsPort }}
{{- range $key, $value := .Values.sidecar.settings }}
{{- if and (not (kindIs "invalid" $value)) (not (and (kindIs "slice" $value) (eq (len $value) 0))) }}
- {{ printf "--%s=%s" (kebabcase $key) (include "specdec-sidecar.settingValue" $value) | quote }}
{{- end }}
{{- end }}
{{- if .Values.vllm.apiKeySecret.name }}
- --upstream-api-key-file={{ include "specdec-sidecar.apiKeyDir" . }}/{{ .Values.vllm.apiKeySecret.key }}
{{- end }}
{{- if include "specdec-sidecar.calibrationConfigMap" . }}
- --calibration={{ include "specdec-sidecar.calibrationDir" . }}/calibration.json
{{- end }}
{{- range .Values.sidecar.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
specdec-sidecar.vllmArgs: vLLM's server arguments as a YAML list. With vllm.speculativeConfig set (the
default) it includes --per-request-spec-decode-metrics summary (per-request acceptance in responses; vLLM 0.32
refuses it without --speculative-config); --enable-force-include-usage (the final usage chunk, carrying those
metrics, on every stream) always. tests/test_helm.py parses the result with vLLM's own parser and config.
*/}}
{{- define "specdec-sidecar.vllmArgs" -}}
- --model
- {{ .Values.vllm.model | quote }}
{{- with .Values.vllm.servedModelName }}
- --served-model-name
- {{ . | quote }}
{{- end }}
- --host
- {{ .Values.vllm.listenHost | quote }}
- --port
- {{ .Values.vllm.port | quote }}
{{- with .Values.vllm.speculativeConfig }}
{{- if and (kindIs "string" .) (hasKey (fromJson .) "Error") }}
{{- fail (printf "vllm.speculativeConfig is not a JSON object: %s" .) }}
{{- end }}
- --speculative-config
- {{ (kindIs "string" .) | ternary . (toJson .) | quote }}
- --per-request-spec-decode-metrics
- summary
{{- end }}
- --enable-force-include-usage
{{- range .Values.vllm.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
specdec-sidecar.vllmProbeAction: how the vLLM probes reach vLLM's /health. With vLLM bound to 127.0.0.1 the
kubelet cannot reach it (it connects to the pod IP), so the check runs inside the vLLM container with the
image's own Python; otherwise an ordinary httpGet on the internal port.
*/}}
{{- define "specdec-sidecar.vllmProbeAction" -}}
{{- if eq .Values.vllm.listenHost "127.0.0.1" }}
exec:
  command:
    - python3
    - -c
    - {{ printf "import urllib.request; urllib.request.urlopen('http://127.0.0.1:%v/health', timeout=%v)" .Values.vllm.port .Values.vllm.probes.timeoutSeconds | quote }}
{{- else }}
httpGet:
  path: /health
  port: vllm
{{- end }}
timeoutSeconds: {{ .Values.vllm.probes.timeoutSeconds }}
{{- end }}

{{/*
specdec-sidecar.sidecarContainer: the sidecar container spec (list item), used as a native sidecar (init
container with restartPolicy: Always) or as a second container.
*/}}
{{- define "specdec-sidecar.sidecarContainer" -}}
- name: specdec-sidecar
  image: {{ include "specdec-sidecar.sidecarImage" . | quote }}
  imagePullPolicy: {{ .Values.sidecar.image.pullPolicy }}
  {{- if .Values.sidecar.native }}
  restartPolicy: Always
  {{- end }}
  args:
    {{- include "specdec-sidecar.sidecarArgs" . | nindent 4 }}
  {{- with .Values.sidecar.env }}
  env:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.sidecar.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    - name: http
      containerPort: {{ .Values.sidecar.proxyPort }}
      protocol: TCP
    - name: specdec-metrics
      containerPort: {{ .Values.sidecar.metricsPort }}
      protocol: TCP
  livenessProbe:
    httpGet:
      path: /healthz
      port: specdec-metrics
    periodSeconds: {{ .Values.sidecar.probes.periodSeconds }}
    failureThreshold: {{ .Values.sidecar.probes.failureThreshold }}
    timeoutSeconds: {{ .Values.sidecar.probes.timeoutSeconds }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: specdec-metrics
    periodSeconds: {{ .Values.sidecar.probes.periodSeconds }}
    failureThreshold: {{ .Values.sidecar.probes.failureThreshold }}
    timeoutSeconds: {{ .Values.sidecar.probes.timeoutSeconds }}
  resources:
    {{- toYaml .Values.sidecar.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.sidecar.securityContext | nindent 4 }}
  volumeMounts:
    - name: sidecar-tmp
      mountPath: /tmp
    {{- if .Values.vllm.apiKeySecret.name }}
    - name: upstream-api-key
      mountPath: {{ include "specdec-sidecar.apiKeyDir" . }}
      readOnly: true
    {{- end }}
    {{- if include "specdec-sidecar.calibrationConfigMap" . }}
    # The whole directory, not a subPath: the kubelet updates it when the ConfigMap changes.
    - name: calibration
      mountPath: {{ include "specdec-sidecar.calibrationDir" . }}
      readOnly: true
    {{- end }}
{{- end }}

{{/*
specdec-sidecar.calibrationConfigMap: the ConfigMap holding calibration.json (rendered from
sidecar.calibration.data, or sidecar.calibration.existingConfigMap), or "" without a calibration.
*/}}
{{- define "specdec-sidecar.calibrationConfigMap" -}}
{{- if and .Values.sidecar.calibration.data .Values.sidecar.calibration.existingConfigMap }}
{{- fail "sidecar.calibration: set data or existingConfigMap, not both" }}
{{- else if .Values.sidecar.calibration.data }}
{{- printf "%s-calibration" (include "specdec-sidecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- .Values.sidecar.calibration.existingConfigMap }}
{{- end }}
{{- end }}

{{/*
specdec-sidecar.calibrationDir: where the sidecar finds calibration.json (the calibration ConfigMap, mounted).
*/}}
{{- define "specdec-sidecar.calibrationDir" -}}
/etc/specdec-sidecar/calibration
{{- end }}

{{/*
specdec-sidecar.apiKeyDir: where the sidecar finds vLLM's API key (the Secret vllm.apiKeySecret, mounted).
*/}}
{{- define "specdec-sidecar.apiKeyDir" -}}
/etc/specdec-sidecar/upstream-api-key
{{- end }}

{{/*
specdec-sidecar.monitorRelabelings: relabelings of one ServiceMonitor/PodMonitor endpoint: the job (always
"specdec-sidecar" for the sidecar's own metrics: alerts/ selects it by that name; monitoring.vllmMetrics.job
for vLLM's) and namespace, the target's namespace; then the monitor's own relabelings.
Argument: dict "job" <job> "relabelings" <the monitor's relabelings>.
*/}}
{{- define "specdec-sidecar.monitorRelabelings" -}}
- action: replace
  targetLabel: job
  replacement: {{ .job }}
- action: replace
  sourceLabels: [__meta_kubernetes_namespace]
  targetLabel: namespace
{{- with .relabelings }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
specdec-sidecar.monitoringLabels: the labels every monitoring object carries besides the standard ones:
monitoring.labels (shared, e.g. the `release` label a kube-prometheus-stack Prometheus selects by), then the
object's own additionalLabels (which win on a clash). Argument: dict "root" $ "own" <additionalLabels>.
*/}}
{{- define "specdec-sidecar.monitoringLabels" -}}
{{- $labels := merge (dict) (default dict .own) (default dict .root.Values.monitoring.labels) }}
{{- with $labels }}
{{- toYaml . }}
{{- end }}
{{- end }}
