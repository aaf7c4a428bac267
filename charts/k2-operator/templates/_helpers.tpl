{{- define "k2-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "k2-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "k2-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "k2-operator.selectorLabels" -}}
app.kubernetes.io/name: k2-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "k2-operator.labels" -}}
{{ include "k2-operator.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: k2
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The rules the operator needs, shared by the ClusterRole and the per-namespace Roles. */}}
{{- define "k2-operator.namespacedRules" -}}
# The three kinds: kopf watches them and keeps its diff base in an annotation (patch); TTL deletes trainings.
- apiGroups: ["k2.ai"]
  resources: ["k2trainings"]
  verbs: ["get", "list", "watch", "patch", "delete"]
- apiGroups: ["k2.ai"]
  resources: ["k2servings"]
  verbs: ["get", "list", "watch", "patch"]
# The owned ExpertPlacement is created once, then re-shaped only when the serving's shape changes.
- apiGroups: ["k2.ai"]
  resources: ["expertplacements"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["k2.ai"]
  resources: ["k2trainings/status", "k2servings/status", "expertplacements/status"]
  verbs: ["get", "patch"]
# Children, written with server-side apply (patch, and create when absent); listed by owner label so that a child
# still as the operator last applied it is not applied again.
- apiGroups: [""]
  resources: ["configmaps", "serviceaccounts"]
  verbs: ["get", "list", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["statefulsets", "deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Rank pods: watched for placement reports, deleted to roll a group or to stop a broken training gang at once;
# `patch` only because the ranks' Role grants it
# (RBAC lets the operator grant only what it holds).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "patch", "delete"]
# The workers' per-resource ServiceAccount, Role and RoleBinding.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "create", "patch"]
# The servings' ingress NetworkPolicies (spec.networkPolicy): applied, listed and deleted when disabled or scaled down.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{/* The EPLB controller's own name and labels: a different app.kubernetes.io/name keeps its pods out of the
operator's Deployment selector and Service. */}}
{{- define "k2-operator.eplbName" -}}
{{- printf "%s-eplb" (include "k2-operator.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "k2-operator.eplbSelectorLabels" -}}
app.kubernetes.io/name: k2-eplb
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "k2-operator.eplbLabels" -}}
{{ include "k2-operator.eplbSelectorLabels" . }}
app.kubernetes.io/component: eplb-controller
app.kubernetes.io/part-of: k2
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The EPLB controller's rules, exactly what k2_eplb.kube calls: list K2Servings (each pass lists them), get and
apply (patch) ExpertPlacements and their status, create Events, list rank pods (direct scraping without
Prometheus). */}}
{{- define "k2-operator.eplbRules" -}}
- apiGroups: ["k2.ai"]
  resources: ["k2servings"]
  verbs: ["list"]
- apiGroups: ["k2.ai"]
  resources: ["expertplacements"]
  verbs: ["get", "patch"]
- apiGroups: ["k2.ai"]
  resources: ["expertplacements/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
{{- end -}}
