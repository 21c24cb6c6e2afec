// The etcd server, built from the version kubernetes' own module graph requires
// (go.etcd.io/etcd/server/v3), so the three binaries share one go.sum.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
