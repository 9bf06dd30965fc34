{{/* The release's base name, at most 63 characters (a DNS label). */}}
{{- define "speechtune.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "speechtune.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "speechtune.labels" -}}
{{ include "speechtune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The Secret (name and key) holding the default storage URL, or nothing. */}}
{{- define "speechtune.storageSecretName" -}}
{{- if .Values.storage.existingSecret.name -}}
{{- .Values.storage.existingSecret.name -}}
{{- else if .Values.postgresql.enabled -}}
{{- include "speechtune.fullname" . }}-postgresql
{{- end -}}
{{- end -}}

{{- define "speechtune.storageSecretKey" -}}
{{- if .Values.storage.existingSecret.name -}}
{{- .Values.storage.existingSecret.key -}}
{{- else -}}
url
{{- end -}}
{{- end -}}

{{/*
The operator's permissions in a namespace it watches: exactly the calls it makes.
Shared by the per-namespace Roles and the cluster-wide ClusterRole.
*/}}
{{- define "speechtune.operatorRules" -}}
# Studies: kopf watches them, holds its finalizer on them and records its progress on them;
# the runner reads the one spec.warmStart.study names (get) for its Optuna study and state.
- apiGroups: [speechtune.io]
  resources: [speechtuningstudies]
  verbs: [get, list, watch, patch]
# The study's status: counts, best trial, conditions.
- apiGroups: [speechtune.io]
  resources: [speechtuningstudies/status]
  verbs: [patch]
# Trials carry ownerReferences with blockOwnerDeletion to their study, Jobs to their Trial:
# the OwnerReferencesPermissionEnforcement admission plugin requires update on the owner's finalizers.
- apiGroups: [speechtune.io]
  resources: [speechtuningstudies/finalizers, speechtuningtrials/finalizers]
  verbs: [update]
# One SpeechTuningTrial per trial: listed on (re)start, created, relabelled with its rung when
# promoted up the fidelity ladder, pruned by spec.retention.keepTrials.
- apiGroups: [speechtune.io]
  resources: [speechtuningtrials]
  verbs: [get, list, create, patch, delete]
- apiGroups: [speechtune.io]
  resources: [speechtuningtrials/status]
  verbs: [patch]
# One Job per trial, watched for its end and deleted when the trial is pruned.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
# Warm worker pods: a worker Job's annotation records the run it was given, so a restarted operator knows.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [patch]
# Warm worker pods: each worker's token is a Secret created with it and deleted with it (by uid: only its own).
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, delete]
# Trials of several pods (trialTemplate.replicas): a headless Service per run gives the pods their DNS names.
- apiGroups: [""]
  resources: [services]
  verbs: [create]
# Trial pods: watched for phase and exit code; their logs carry the metrics.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
# spec.storage.secretRef: a study's own database URL; spec.warmStart.storage.secretRef: its source's.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
# Events on studies: trial started, pruned, promoted, failed, study finished.
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
