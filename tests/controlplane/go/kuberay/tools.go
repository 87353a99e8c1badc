//go:build tools

// The command(s) this module builds; the import keeps `go mod tidy` from dropping them.
package tools

import (
	_ "github.com/ray-project/kuberay/ray-operator"
)
