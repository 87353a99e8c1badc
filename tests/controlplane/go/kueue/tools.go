//go:build tools

// The command(s) this module builds; the import keeps `go mod tidy` from dropping them.
package tools

import (
	_ "sigs.k8s.io/kueue/cmd/kueue"
)
