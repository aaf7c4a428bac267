//go:build tools

// Package tools pins the Prometheus server that `make tools` builds for the local cluster (Kubernetes service
// discovery only: hack/build-tools.sh builds it with the remove_all_sd and enable_kubernetes_sd tags).
package tools

import (
	_ "github.com/prometheus/prometheus/cmd/prometheus"
)
