// snapbench measures the latency of snapshotter calls through containerd's own client stack
// (snapshots/proxy over gRPC on a unix socket), the way containerd calls a proxy plugin:
//
//   - Prepare+Mounts: one Prepare of a new active snapshot on a committed parent, then one
//     Mounts of it (the pair containerd issues when it creates a container's rootfs);
//   - Commit: Commit of a fresh, empty active snapshot on the same parent;
//
// each with the parent at every requested depth (the chain is built first by Prepare/Commit of
// empty layers). Set-up and removal calls are not timed. Removal goes through Remove and then
// Cleanup, outside the timed region.
//
//	snapbench --socket PATH [--backend LABEL] [--snapshotter NAME] [--iters 200] [--warmup 10]
//	          [--depths 1,128] [--tsv]
//
// It prints a table (or, with --tsv, one tab-separated line per measurement:
// backend op depth n p50_us p99_us mean_us max_us).
package main

import (
	"context"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/errdefs"
	"github.com/containerd/containerd/mount"
	"github.com/containerd/containerd/namespaces"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"

	snapdial "../snapdial"
)

type result struct {
	op    string
	depth int
	times []time.Duration
}

func main() {
	socket := flag.String("socket", "", "snapshotter gRPC unix socket")
	backend := flag.String("backend", "", "label for the output (default: the snapshotter name)")
	name := flag.String("snapshotter", "bench", "snapshotter name sent in every request")
	iters := flag.Int("iters", 200, "timed iterations per measurement")
	warmup := flag.Int("warmup", 10, "untimed iterations before each measurement")
	depthList := flag.String("depths", "1,128", "comma-separated parent chain depths")
	tsv := flag.Bool("tsv", false, "print tab-separated result lines instead of a table")
	flag.Parse()
	if *socket == "" || *iters < 1 {
		fmt.Fprintln(os.Stderr, "usage: snapbench --socket PATH [--iters N] [--depths 1,128] [--tsv]")
		os.Exit(2)
	}
	if *backend == "" {
		*backend = *name
	}
	var depths []int
	for _, f := range strings.Split(*depthList, ",") {
		d, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || d < 1 {
			fatalf("bad depth %q", f)
		}
		depths = append(depths, d)
	}

	ctx := namespaces.WithNamespace(context.Background(), "snapbench")
	conn, err := snapdial.Dial(ctx, *socket)
	if err != nil {
		fatalf("dial %s: %v", *socket, err)
	}
	defer conn.Close()
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), *name)

	var results []result
	for _, d := range depths {
		rs, err := benchDepth(ctx, sn, d, *warmup, *iters)
		if err != nil {
			fatalf("depth %d: %v", d, err)
		}
		results = append(results, rs...)
	}
	print(*backend, results, *tsv)
}

// benchDepth builds a chain of depth committed layers, times both operations on its top,
// and removes everything it created.
func benchDepth(ctx context.Context, sn snapshots.Snapshotter, depth, warmup, iters int) ([]result, error) {
	prefix := fmt.Sprintf("snapbench/%d/%d", os.Getpid(), depth)
	var chain []string
	parent := ""
	for i := 1; i <= depth; i++ {
		key := fmt.Sprintf("%s/build-active-%d", prefix, i)
		name := fmt.Sprintf("%s/layer-%d", prefix, i)
		if _, err := sn.Prepare(ctx, key, parent); err != nil {
			return nil, fmt.Errorf("build layer %d: prepare: %w", i, err)
		}
		if err := sn.Commit(ctx, name, key); err != nil {
			return nil, fmt.Errorf("build layer %d: commit: %w", i, err)
		}
		chain = append(chain, name)
		parent = name
	}

	// Sanity check, on stderr: what the mounts of a snapshot on this parent look like.
	probe := prefix + "/probe"
	m, err := sn.Prepare(ctx, probe, parent)
	if err != nil {
		return nil, fmt.Errorf("probe prepare: %w", err)
	}
	fmt.Fprintf(os.Stderr, "snapbench: depth %d: %s\n", depth, describe(m))
	if err := sn.Remove(ctx, probe); err != nil {
		return nil, fmt.Errorf("probe remove: %w", err)
	}

	pm := result{op: "Prepare+Mounts", depth: depth}
	for i := 0; i < warmup+iters; i++ {
		key := fmt.Sprintf("%s/pm-%d", prefix, i)
		start := time.Now()
		if _, err := sn.Prepare(ctx, key, parent); err != nil {
			return nil, fmt.Errorf("prepare %s: %w", key, err)
		}
		mounts, err := sn.Mounts(ctx, key)
		elapsed := time.Since(start)
		if err != nil {
			return nil, fmt.Errorf("mounts %s: %w", key, err)
		}
		if len(mounts) == 0 {
			return nil, fmt.Errorf("mounts %s: empty", key)
		}
		if i >= warmup {
			pm.times = append(pm.times, elapsed)
		}
		if err := sn.Remove(ctx, key); err != nil {
			return nil, fmt.Errorf("remove %s: %w", key, err)
		}
	}
	if err := cleanup(ctx, sn); err != nil {
		return nil, err
	}

	commit := result{op: "Commit", depth: depth}
	for i := 0; i < warmup+iters; i++ {
		key := fmt.Sprintf("%s/c-active-%d", prefix, i)
		name := fmt.Sprintf("%s/c-%d", prefix, i)
		if _, err := sn.Prepare(ctx, key, parent); err != nil {
			return nil, fmt.Errorf("prepare %s: %w", key, err)
		}
		start := time.Now()
		err := sn.Commit(ctx, name, key)
		elapsed := time.Since(start)
		if err != nil {
			return nil, fmt.Errorf("commit %s: %w", key, err)
		}
		if i >= warmup {
			commit.times = append(commit.times, elapsed)
		}
		if err := sn.Remove(ctx, name); err != nil {
			return nil, fmt.Errorf("remove %s: %w", name, err)
		}
	}

	for i := len(chain) - 1; i >= 0; i-- {
		if err := sn.Remove(ctx, chain[i]); err != nil {
			return nil, fmt.Errorf("remove %s: %w", chain[i], err)
		}
	}
	if err := cleanup(ctx, sn); err != nil {
		return nil, err
	}
	return []result{pm, commit}, nil
}

func cleanup(ctx context.Context, sn snapshots.Snapshotter) error {
	c, ok := sn.(snapshots.Cleaner)
	if !ok {
		return nil
	}
	if err := c.Cleanup(ctx); err != nil && !errdefs.IsNotImplemented(err) {
		return fmt.Errorf("cleanup: %w", err)
	}
	return nil
}

// describe summarises mounts: type, and the number of lower directories of an overlay.
func describe(mounts []mount.Mount) string {
	var parts []string
	for _, m := range mounts {
		s := m.Type
		for _, o := range m.Options {
			if strings.HasPrefix(o, "lowerdir=") {
				s += fmt.Sprintf(" (%d lowerdirs)", len(strings.Split(strings.TrimPrefix(o, "lowerdir="), ":")))
			}
		}
		parts = append(parts, s)
	}
	return fmt.Sprintf("%d mount(s): %s", len(mounts), strings.Join(parts, ", "))
}

// percentile returns the nearest-rank p-th percentile of sorted samples.
func percentile(sorted []time.Duration, p float64) time.Duration {
	rank := int(math.Ceil(p / 100 * float64(len(sorted))))
	if rank < 1 {
		rank = 1
	}
	return sorted[rank-1]
}

func micros(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

func print(backend string, results []result, tsv bool) {
	if !tsv {
		fmt.Printf("%-10s %-15s %5s %5s %10s %10s %10s %10s\n", "backend", "op", "depth", "n", "p50 µs", "p99 µs", "mean µs", "max µs")
	}
	for _, r := range results {
		s := append([]time.Duration(nil), r.times...)
		sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
		var sum time.Duration
		for _, d := range s {
			sum += d
		}
		mean := sum / time.Duration(len(s))
		if tsv {
			fmt.Printf("%s\t%s\t%d\t%d\t%.0f\t%.0f\t%.0f\t%.0f\n", backend, r.op, r.depth, len(s),
				micros(percentile(s, 50)), micros(percentile(s, 99)), micros(mean), micros(s[len(s)-1]))
		} else {
			fmt.Printf("%-10s %-15s %5d %5d %10.0f %10.0f %10.0f %10.0f\n", backend, r.op, r.depth, len(s),
				micros(percentile(s, 50)), micros(percentile(s, 99)), micros(mean), micros(s[len(s)-1]))
		}
	}
}

func fatalf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "snapbench: "+format+"\n", args...)
	os.Exit(1)
}
