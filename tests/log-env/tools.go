//go:build tools

// Keeps VictoriaLogs' main package in the module graph for `go mod tidy`.
package tools

import (
	_ "github.com/VictoriaMetrics/VictoriaLogs/app/victoria-logs"
)
