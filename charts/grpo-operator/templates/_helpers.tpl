{{- define "grpo-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "grpo-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "grpo-operator.labels" -}}
{{ include "grpo-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The operator's ServiceAccount, as the subject of its bindings. */}}
{{- define "grpo-operator.subjects" -}}
- kind: ServiceAccount
  name: {{ include "grpo-operator.fullname" . }}
  namespace: {{ .Release.Namespace }}
{{- end -}}

{{/* An image of this chart: image NAME, e.g. (include "grpo-operator.image" (list . "trainer")). */}}
{{- define "grpo-operator.image" -}}
{{- $root := index . 0 -}}
{{- $images := $root.Values.images -}}
{{- printf "%s/%s:%s" $images.registry (get $images (index . 1)) ($images.tag | default $root.Chart.AppVersion) -}}
{{- end -}}

{{/*
What the operator does in the namespaces it watches: exactly the API calls of grpo_operator
(cluster.py, handlers.py) and of kopf for its handlers, verb by verb. tests/test_chart_rbac.py
runs the operator against the API emulator with only these rules and fails on a call they do not
allow, and on a rule no call used.
*/}}
{{- define "grpo-operator.runRules" -}}
- apiGroups: [grpo.dev]
  resources: [grporuns]
  # list, watch: kopf's watch of the runs; get: each reconcile pass reads its run; patch: kopf's
  # finalizer; delete: spec.ttlSecondsAfterFinished.
  verbs: [get, list, watch, patch, delete]
- apiGroups: [grpo.dev]
  resources: [grporuns/status]
  # patch: the operator's status fields. get is never called: the API server lets the operator
  # create the trainer's Role (get and patch of its run's status) only if it holds both itself.
  verbs: [get, patch]
- apiGroups: [""]
  resources: [pods]
  # list, watch: the runs' trainer and evaluation pods; create: an attempt; delete: suspend, deadline.
  verbs: [list, watch, create, delete]
- apiGroups: [batch]
  resources: [jobs]
  # The evaluation Jobs: created, read by label, watched. The garbage collector deletes them.
  verbs: [list, watch, create]
- apiGroups: [""]
  resources: [configmaps, serviceaccounts]
  # A run's manifest and its trainer's and evaluations' accounts: created, or adopted by a patch.
  verbs: [create, patch]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  # The trainer's Role (its run's status) and its binding: created, or adopted by a patch.
  verbs: [create, patch]
- apiGroups: [""]
  resources: [events]
  # kopf posts the run's events; the trainer's Role grants the same.
  verbs: [create]
{{- end -}}
