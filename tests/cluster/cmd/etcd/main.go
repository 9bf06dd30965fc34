// Command etcd is the etcd server at the version k8s.io/kubernetes pins for its client,
// so the API server talks to the etcd it was tested against.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
