#!/usr/bin/env bash
# The operator end to end on a laptop with Docker: a kind cluster, the operator installed by the
# Helm chart, and examples/cpu-smollm2.yaml (spec.resources.gpus 0: one CPU container, in-process
# sampling) trained through it to Succeeded, then deleted. About 45 minutes on 2 cores (80 steps).
#
# Not run by this repository's CI (no Docker daemon there); it is for users and releases.
# Needs docker, kind and kubectl on the PATH, and helm there or in .tools/bin (scripts/install-tools.sh).
#   CLUSTER=grpo-e2e   the kind cluster's name (created if missing)
#   KEEP_CLUSTER=1     leave the cluster running at the end
#   TIMEOUT=90m        how long the run may take to succeed
# The run asks for 2 CPUs and 6 GiB (its spec.resources): give Docker at least that.
set -euo pipefail
cd "$(dirname "$0")/.."

cluster=${CLUSTER:-grpo-e2e}
timeout=${TIMEOUT:-90m}
registry=grpo.local  # never pulled: kind loads the images into its node
tag=e2e
helm=$(command -v helm || echo .tools/bin/helm)
for tool in docker kind kubectl "$helm"; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 2; }
done

if ! kind get clusters | grep -qx "$cluster"; then
  kind create cluster --name "$cluster" --wait 120s
fi
context=kind-$cluster
kubectl=(kubectl --context "$context")

# The operator, and the CPU trainer under the name the chart gives runs' trainers.
docker build --file images/operator.Dockerfile --tag "$registry/operator:$tag" .
docker build --file images/cpu-trainer.Dockerfile --tag "$registry/trainer:$tag" .
kind load docker-image --name "$cluster" "$registry/operator:$tag" "$registry/trainer:$tag"

"$helm" upgrade --install grpo-operator charts/grpo-operator --kube-context "$context" \
  --namespace grpo-system --create-namespace --wait --timeout 5m \
  --set images.registry="$registry" --set images.tag="$tag"

"${kubectl[@]}" apply -f examples/cpu-smollm2.yaml
"${kubectl[@]}" wait grporun/cpu-smollm2 --for=jsonpath='{.status.phase}'=Running --timeout=10m
echo "training; follow it with: kubectl --context $context get grporuns -w"
if ! "${kubectl[@]}" wait grporun/cpu-smollm2 --for=jsonpath='{.status.phase}'=Succeeded --timeout="$timeout"; then
  "${kubectl[@]}" describe grporun cpu-smollm2 >&2
  exit 1
fi
"${kubectl[@]}" get grporun cpu-smollm2 -o wide

# Deleted, the run takes everything it owns with it.
"${kubectl[@]}" delete grporun cpu-smollm2 --wait --timeout=2m
left=$("${kubectl[@]}" get pods,configmaps,serviceaccounts,roles,rolebindings -l grpo.dev/run=cpu-smollm2 -o name)
if [ -n "$left" ]; then
  echo "left behind by the deleted run: $left" >&2
  exit 1
fi
echo "end to end: passed"
if [ -z "${KEEP_CLUSTER:-}" ]; then
  kind delete cluster --name "$cluster"
fi
