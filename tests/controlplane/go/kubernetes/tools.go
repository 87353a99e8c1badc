//go:build tools

// The commands this module builds (go build -o DIR k8s.io/kubernetes/cmd/...); the import keeps `go mod tidy`
// from dropping them.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
