// overlayd serves containerd's built-in overlayfs snapshotter (snapshots/overlay, configured
// as containerd 1.6's plugin configures it: asynchronous remove) over the snapshots gRPC API
// on a unix socket. It is the reference backend of the conformance tier and of the latency
// benchmark: the same harness runs against it and against lamina.
//
//	overlayd --root DIR --socket PATH
//
// SIGTERM or SIGINT stops it: the listener closes, in-flight calls are cut, the metadata
// database is closed and the process exits 0.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/snapshots/overlay"
	"google.golang.org/grpc"
)

func main() {
	root := flag.String("root", "", "snapshotter root directory (created if missing)")
	socket := flag.String("socket", "", "unix socket to serve the snapshots API on")
	flag.Parse()
	if *root == "" || *socket == "" {
		fmt.Fprintln(os.Stderr, "usage: overlayd --root DIR --socket PATH")
		os.Exit(2)
	}
	if err := run(*root, *socket); err != nil {
		fmt.Fprintln(os.Stderr, "overlayd:", err)
		os.Exit(1)
	}
}

func run(root, socket string) error {
	sn, err := overlay.NewSnapshotter(root, overlay.AsynchronousRemove)
	if err != nil {
		return fmt.Errorf("overlay snapshotter on %s: %w", root, err)
	}
	defer sn.Close()

	if err := os.Remove(socket); err != nil && !os.IsNotExist(err) {
		return err
	}
	l, err := net.Listen("unix", socket)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	fmt.Fprintf(os.Stderr, "overlayd: serving %s on %s (pid %d)\n", root, socket, os.Getpid())

	select {
	case sig := <-sigs:
		fmt.Fprintf(os.Stderr, "overlayd: %v, stopping\n", sig)
		srv.Stop()
		<-served
		return nil
	case err := <-served:
		return err
	}
}
