#!/usr/bin/env bash
# The end-to-end suite on a kind cluster, for machines with Docker (CI: .github/workflows/kind-e2e.yaml).
#
# Creates a kind cluster, builds the worker image with the Dockerfile, loads it into the cluster's nodes, installs
# the chart with that image, and runs e2e/ against the cluster through K2_E2E_KUBECONFIG. Everything runs for real:
# no kwok, no fake annotations (the e2e test's kwok pinning applies only to the local control plane). It cannot run
# on the development VMs, which have no Docker engine (docs/development.md).
#
# Needs: docker, kind, kubectl, helm on PATH, and the project's .venv (make venv). Environment:
#   KIND_CLUSTER  cluster name (default k2-e2e)       KEEP_CLUSTER=1  leave the cluster up afterwards
#   IMAGE         image tag (default docker.io/k2-operator/worker:dev)
set -euo pipefail

cd "$(dirname "$0")/.."
CLUSTER="${KIND_CLUSTER:-k2-e2e}"
IMAGE="${IMAGE:-docker.io/k2-operator/worker:dev}"
NAMESPACE=k2-system
RELEASE=k2
KUBECONFIG_FILE="$(mktemp -d)/kubeconfig"

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "kind-e2e: $tool is not on PATH" >&2; exit 1; }
done
[[ -x .venv/bin/pytest ]] || { echo "kind-e2e: no .venv: run make venv" >&2; exit 1; }

cleanup() {
  if [[ "${KEEP_CLUSTER:-}" != 1 ]]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

# Two workers beside the control plane: each kind node reports all the host's CPUs, and the examples ask for seven.
kind create cluster --name "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE" --wait 180s --config - <<'KIND'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
  - role: worker
KIND
export KUBECONFIG="$KUBECONFIG_FILE"

# The examples' pods ask for nvidia.com/gpu: each worker advertises 8 as an extended resource, as the local cluster's
# real node does (the kubelet keeps capacity it does not manage). The workers run on CPU with gloo.
for node in $(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' -o name); do
  kubectl patch "$node" --subresource=status --type=merge -p '{"status":{"capacity":{"nvidia.com/gpu":"8"}}}'
done

# The same image `make image` builds without Docker (tests/cluster/test_image.py keeps the two in step).
DOCKER_BUILDKIT=1 docker build -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

# The chart with the project image: the operator runs `k2 operator run` from it, as the worker pods run `k2 worker`.
helm install "$RELEASE" charts/k2-operator --namespace "$NAMESPACE" --create-namespace --wait --timeout 5m \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=IfNotPresent
kubectl -n "$NAMESPACE" rollout status deployment --timeout=180s
# The e2e test starts an operator of its own (tests/operator/harness.py) and checks its log for errors; the chart's
# operator, now shown to start from the image, would reconcile the same objects, so it is scaled to zero meanwhile.
kubectl -n "$NAMESPACE" scale deployment --all --replicas=0

# The live-loop tests read the load from a Prometheus that discovers the rank pods (hack/kind-prometheus.yaml), with
# the local cluster's scrape job; the EPLB controller reaches it by its Service name, the tests by a port-forward.
kubectl create namespace monitoring
.venv/bin/python - > "$(dirname "$KUBECONFIG_FILE")/prometheus.yml" <<'PY'
import sys
import yaml
sys.path.insert(0, "hack")
from localcluster.prometheus import in_cluster_scrape_config, prometheus_config
print(yaml.safe_dump(prometheus_config(in_cluster_scrape_config())))
PY
kubectl -n monitoring create configmap prometheus --from-file="$(dirname "$KUBECONFIG_FILE")/prometheus.yml"
kubectl apply -f hack/kind-prometheus.yaml
kubectl -n monitoring rollout status deployment/prometheus --timeout=180s
kubectl -n monitoring port-forward --address 127.0.0.1 service/prometheus 19090:9090 >/dev/null &
FORWARD=$!
trap 'kill $FORWARD 2>/dev/null || true; cleanup' EXIT

K2_E2E_KUBECONFIG="$KUBECONFIG_FILE" \
K2_E2E_PROMETHEUS_URL=http://127.0.0.1:19090 \
K2_E2E_PROMETHEUS_POD_URL=http://prometheus.monitoring.svc:9090 \
  .venv/bin/pytest e2e -m e2e -v -p no:cacheprovider "$@"
