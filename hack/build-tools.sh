#!/usr/bin/env bash
# Builds the pinned control-plane, real-node and chart tools into .tools/bin/ (CNI plugins: .tools/cni/bin/) from the
# Go module proxy.
# Idempotent: a tool whose stamp file names the pinned version is not rebuilt.
# Go's module and build caches live in the user's cache directories (go env GOMODCACHE/GOCACHE), never in the repo.
set -euo pipefail

cd "$(dirname "$0")/.."
BIN="$PWD/.tools/bin"
STAMPS="$PWD/.tools/stamps"
mkdir -p "$BIN" "$STAMPS"
export CGO_ENABLED=0 GOFLAGS="-mod=mod" GOTOOLCHAIN=local

KUBERNETES_VERSION=v1.34.4   # keep in step with the replace block in hack/tools/kubernetes/go.mod
ETCD_VERSION=v3.6.16         # keep in step with hack/tools/etcd/go.mod
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.21.4
KUBECONFORM_VERSION=v0.7.0
KUSTOMIZE_VERSION=v5.7.1     # the kustomize base (deploy/kustomize); kubectl 1.34 embeds the same version
CNI_PLUGINS_VERSION=v1.6.2   # the real node's pod network: bridge, host-local, loopback, portmap
COREDNS_VERSION=v1.15.0      # the real node's cluster DNS
CRICTL_VERSION=v1.34.0       # CRI client: cluster-down removes the real node's pod sandboxes with it
PROMETHEUS_VERSION=v0.316.0  # Prometheus 3.16.0 (the Go module's v0.3xx); keep in step with hack/tools/prometheus/go.mod

fresh() {  # fresh NAME VERSION: true when NAME was already built at VERSION
  [[ -x "$BIN/$1" && "$(cat "$STAMPS/$1" 2>/dev/null)" == "$2" ]]
}
stamp() { echo "$2" > "$STAMPS/$1"; }

build_kubernetes() {
  local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
  local ld="-s -w" kv
  for kv in gitVersion=$KUBERNETES_VERSION gitMajor=1 gitMinor=$minor gitTreeState=clean \
            buildDate=1970-01-01T00:00:00Z; do
    ld="$ld -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
  done
  local cmds=() c
  for c in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
    fresh "$c" "$KUBERNETES_VERSION" || cmds+=("k8s.io/kubernetes/cmd/$c")
  done
  [[ ${#cmds[@]} -eq 0 ]] && return
  echo "building ${cmds[*]} at $KUBERNETES_VERSION (a cold build takes tens of minutes on 2 cores)"
  (cd hack/tools/kubernetes && go build -trimpath -ldflags "$ld" -o "$BIN/" "${cmds[@]}")
  for c in "${cmds[@]}"; do stamp "${c##*/}" "$KUBERNETES_VERSION"; done
}

build_etcd() {
  fresh etcd "$ETCD_VERSION" && return
  echo "building etcd $ETCD_VERSION"
  (cd hack/tools/etcd && go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3)
  stamp etcd "$ETCD_VERSION"
}

build_prometheus() {  # the local cluster's Prometheus, with Kubernetes service discovery only and no web UI assets
  fresh prometheus "$PROMETHEUS_VERSION" && return
  echo "building prometheus $PROMETHEUS_VERSION (kubernetes_sd_configs only)"
  local v=github.com/prometheus/common/version m=${PROMETHEUS_VERSION#v0.}; m=${m%%.*}  # v0.316.0 is release 3.16.0
  local release="${m:0:1}.${m:1}.${PROMETHEUS_VERSION##*.}"
  (cd hack/tools/prometheus && nice -n 10 go build -trimpath -tags remove_all_sd,enable_kubernetes_sd \
    -ldflags "-s -w -X $v.Version=$release -X $v.Revision=$PROMETHEUS_VERSION -X $v.Branch=HEAD" \
    -o "$BIN/prometheus" github.com/prometheus/prometheus/cmd/prometheus)
  stamp prometheus "$PROMETHEUS_VERSION"
}

install_tool() {  # install_tool NAME PACKAGE VERSION [LDFLAGS]
  fresh "$1" "$3" && return
  echo "installing $1 $3"
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w ${4:-}" "$2@$3"
  stamp "$1" "$3"
}

build_cni_plugins() {  # into .tools/cni/bin, the directory containerd's CRI plugin looks in
  local cni="$PWD/.tools/cni/bin" p
  [[ -x "$cni/portmap" && "$(cat "$STAMPS/cni-plugins" 2>/dev/null)" == "$CNI_PLUGINS_VERSION" ]] && return
  echo "installing CNI plugins $CNI_PLUGINS_VERSION"
  mkdir -p "$cni"
  for p in main/bridge ipam/host-local main/loopback meta/portmap; do
    GOBIN="$cni" go install -trimpath -ldflags "-s -w" \
      "github.com/containernetworking/plugins/plugins/$p@$CNI_PLUGINS_VERSION"
  done
  stamp cni-plugins "$CNI_PLUGINS_VERSION"
}

build_kstatus() {  # the kstatus CLI of the tests (hack/kstatus: sigs.k8s.io/cli-utils' kstatus), keyed by its sources
  local key
  key=$(cat hack/kstatus/go.mod hack/kstatus/go.sum hack/kstatus/main.go | sha256sum | cut -c1-16)
  fresh kstatus "$key" && return
  echo "building kstatus ($key)"
  (cd hack/kstatus && go build -trimpath -ldflags "-s -w" -o "$BIN/kstatus" .)
  stamp kstatus "$key"
}

build_etcd
install_tool kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
install_tool helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
install_tool kubeconform github.com/yannh/kubeconform/cmd/kubeconform "$KUBECONFORM_VERSION"
install_tool kustomize sigs.k8s.io/kustomize/kustomize/v5 "$KUSTOMIZE_VERSION"
build_kubernetes
build_cni_plugins
install_tool coredns github.com/coredns/coredns "$COREDNS_VERSION"
install_tool crictl sigs.k8s.io/cri-tools/cmd/crictl "$CRICTL_VERSION"
build_kstatus
build_prometheus
