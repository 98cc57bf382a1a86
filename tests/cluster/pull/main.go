// Command pull pulls one image through containerd's Go client with unpack during the pull
// (containerd.WithPullUnpack), the path the CRI plugin and nerdctl take: containerd's unpacker
// calls Prepare with the label containerd.io/snapshot.ref for each layer before it fetches that
// layer's blob, so a snapshotter that answers AlreadyExists saves the fetch and the unpack.
//
//	pull -address SOCK -namespace NS -snapshotter NAME -ref 127.0.0.1:PORT/name:tag
//
// Prints one JSON line: {"ref":..., "seconds":..., "unpacked":true}. Plain HTTP registries only.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	"github.com/containerd/containerd"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/remotes/docker"
)

func main() {
	address := flag.String("address", "", "containerd socket")
	ns := flag.String("namespace", "default", "containerd namespace")
	snapshotter := flag.String("snapshotter", "lamina", "snapshotter to unpack into")
	ref := flag.String("ref", "", "image reference (plain HTTP registry)")
	timeout := flag.Duration("timeout", 10*time.Minute, "give up after this long")
	flag.Parse()
	if *address == "" || *ref == "" {
		fmt.Fprintln(os.Stderr, "usage: pull -address SOCK -ref REF [-namespace NS] [-snapshotter NAME]")
		os.Exit(2)
	}
	client, err := containerd.New(*address)
	if err != nil {
		fmt.Fprintf(os.Stderr, "connect %s: %v\n", *address, err)
		os.Exit(1)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), *ns), *timeout)
	defer cancel()
	resolver := docker.NewResolver(docker.ResolverOptions{PlainHTTP: true})
	start := time.Now()
	img, err := client.Pull(ctx, *ref,
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(*snapshotter),
		containerd.WithResolver(resolver))
	if err != nil {
		fmt.Fprintf(os.Stderr, "pull %s: %v\n", *ref, err)
		os.Exit(1)
	}
	unpacked, err := img.IsUnpacked(ctx, *snapshotter)
	if err != nil {
		fmt.Fprintf(os.Stderr, "check unpack of %s: %v\n", *ref, err)
		os.Exit(1)
	}
	out, _ := json.Marshal(map[string]interface{}{
		"ref":      *ref,
		"seconds":  time.Since(start).Seconds(),
		"unpacked": unpacked,
	})
	fmt.Println(string(out))
}
