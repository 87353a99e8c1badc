//go:build tools

// The command(s) this module builds; the import keeps `go mod tidy` from dropping them.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
)
