// Conformance tier: containerd's own snapshotter test suite (snapshots/testsuite, containerd
// 1.6.20 from Debian's golang-github-containerd-containerd-dev) run against a snapshotter that
// is reached only over gRPC, exactly as containerd reaches a proxy plugin.
//
// For every test case the suite asks for a fresh snapshotter on a fresh root. The factory
// below starts one backend process on that root with its own unix socket, dials it and wraps
// the connection with snapshots/proxy. The cleanup closes the connection and stops the process
// by PID (SIGTERM, then SIGKILL after a grace period); it runs also when the test fails.
//
// lamina is started by lamina-testkit-serve, the test kit's launcher of lamina serve (crates/testkit):
// it stops lamina on SIGTERM, or when the pipe on its stdin closes because this process died.
//
// Environment:
//
//	CONFORMANCE_BACKEND  lamina (default), lamina-rbd (lamina with [store] backend = "rbd": layers
//	                     as RBD images in the cluster of CEPH_CONF, one image prefix per test case,
//	                     removed by the launcher after the case) or overlayfs (the stand-in in
//	                     ./overlayd, which serves containerd's built-in overlayfs snapshotter; used to
//	                     validate the harness)
//	CEPH_CONF            lamina-rbd only: the ceph.conf of a running cluster whose pool "rbd" is
//	                     initialised (scripts/conformance.sh starts one with lamina-testkit-serve
//	                     --ceph-cluster)
//	LAMINA_TESTKIT_SERVE the launcher (default ../../target/debug/lamina-testkit-serve, relative to
//	                     this dir)
//	LAMINA_BIN           lamina binary (default: the lamina next to the launcher)
//	OVERLAYD_BIN         stand-in binary (default ../../target/conformance/bin/overlayd)
//	LAMINA_LOG_LEVEL     lamina's --log-level (e.g. debug)
//	CONFORMANCE_LOG_DIR  keep each backend process's output there (default: inside the test root)
//	CI=true              a missing prerequisite (root) fails instead of skipping
//
// Build and run it with scripts/conformance.sh.
package conformance

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/snapshots"
	"github.com/containerd/containerd/snapshots/proxy"
	"github.com/containerd/containerd/snapshots/testsuite"
	"google.golang.org/grpc"

	snapdial "./snapdial"
)

const (
	startTimeout = 20 * time.Second
	// lamina-testkit-serve gives lamina 10 s to exit on SIGTERM, then detaches its mounts
	stopTimeout = 20 * time.Second
	// lamina-rbd: lamina still gets 10 s (the launcher fails the case if it takes longer), then the
	// launcher takes down the attachments (up to 10 s) and removes the case's images, about 1 s per image
	// (snap ls, unprotect, purge, rm), more as the pool grows: 16 s for 17 images in e2e_rbd_layers, 197 s
	// for 128LayersMount's 129 images
	rbdStopTimeout = 10 * time.Minute
)

// backend describes how to start one snapshotter server for a test root.
type backend struct {
	name string // suite name and snapshotter name sent in every request
	bin  string
	args func(root, socket, logPath string) []string
	env  []string // added to this process's environment
	// how long the process may take to exit on SIGTERM
	stopTimeout time.Duration
}

func selectBackend(t *testing.T) backend {
	kind := os.Getenv("CONFORMANCE_BACKEND")
	if kind == "" {
		kind = "lamina"
	}
	switch kind {
	case "lamina", "lamina-rbd":
		var rbdArgs func(root string) []string
		stop := stopTimeout
		if kind == "lamina-rbd" {
			stop = rbdStopTimeout
			conf := os.Getenv("CEPH_CONF")
			if conf == "" {
				t.Fatalf("CONFORMANCE_BACKEND=lamina-rbd needs CEPH_CONF (the ceph.conf of a running cluster)")
			}
			rbdArgs = func(root string) []string {
				// root is <tmp>/snapshot-suite-<name>-<random>/root: one prefix per test case
				return []string{"--rbd-ceph-conf", conf, "--rbd-image-prefix", imagePrefix(filepath.Base(filepath.Dir(root)))}
			}
		}
		var env []string
		if os.Getenv("LAMINA_BIN") != "" {
			env = append(env, "LAMINA_BIN="+envPath("LAMINA_BIN", ""))
		}
		return backend{
			name: kind,
			bin:  envPath("LAMINA_TESTKIT_SERVE", "../../target/debug/lamina-testkit-serve"),
			args: func(root, socket, logPath string) []string {
				args := []string{"--data-root", filepath.Join(root, "lamina"),
					"--snapshotter-socket", socket, "--log", logPath}
				if rbdArgs != nil {
					args = append(args, rbdArgs(root)...)
				}
				if level := os.Getenv("LAMINA_LOG_LEVEL"); level != "" {
					args = append(args, "--log-level", level)
				}
				return args
			},
			env:         env,
			stopTimeout: stop,
		}
	case "overlayfs":
		return backend{
			name: "overlayfs",
			bin:  envPath("OVERLAYD_BIN", "../../target/conformance/bin/overlayd"),
			args: func(root, socket, _ string) []string {
				return []string{"--root", filepath.Join(root, "overlayfs"), "--socket", socket}
			},
			stopTimeout: stopTimeout,
		}
	}
	t.Fatalf("CONFORMANCE_BACKEND=%q: expected lamina, lamina-rbd or overlayfs", kind)
	return backend{}
}

// imagePrefix turns a test root's directory name into an RBD image name prefix (letters, digits,
// '-', '_').
func imagePrefix(base string) string {
	b := []byte("conf-" + base + "-")
	for i, c := range b {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			b[i] = '_'
		}
	}
	return string(b)
}

func envPath(name, def string) string {
	p := os.Getenv(name)
	if p == "" {
		p = def
	}
	if abs, err := filepath.Abs(p); err == nil {
		p = abs
	}
	return p
}

// requireRoot skips (loudly) when not root, or fails under CI=true: the suite mounts the
// returned overlay and bind mounts in this process.
func requireRoot(t *testing.T) {
	if os.Geteuid() == 0 {
		return
	}
	msg := "SKIPPED: the snapshotter conformance suite mounts filesystems and needs root"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg + " (CI=true: failing instead of skipping)")
	}
	fmt.Fprintln(os.Stderr, "\n*** "+msg+" ***")
	t.Skip(msg)
}

func TestSnapshotterConformance(t *testing.T) {
	requireRoot(t)
	b := selectBackend(t)
	if _, err := os.Stat(b.bin); err != nil {
		t.Fatalf("backend %s: binary %s: %v", b.name, b.bin, err)
	}
	testsuite.SnapshotterSuite(t, b.name, func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return startBackend(ctx, b, root)
	})
}

// server is one running backend process.
type server struct {
	cmd         *exec.Cmd
	exited      chan struct{} // closed once cmd.Wait returned
	waitErr     error
	logPath     string
	stopTimeout time.Duration
}

func startBackend(ctx context.Context, b backend, root string) (snapshots.Snapshotter, func() error, error) {
	socket := filepath.Join(root, "s.sock")
	logPath := filepath.Join(root, b.name+".log")
	if dir := os.Getenv("CONFORMANCE_LOG_DIR"); dir != "" {
		// root is <tmp>/snapshot-suite-<name>-<random>/root: the random part names the log
		logPath = filepath.Join(dir, filepath.Base(filepath.Dir(root))+".log")
	}
	// Appending: the launcher and the lamina it starts both write to this file.
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC|os.O_APPEND, 0o644)
	if err != nil {
		return nil, nil, err
	}
	defer logFile.Close() // the child keeps its own descriptor

	cmd := exec.Command(b.bin, b.args(root, socket, logPath)...)
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.Env = append(append(os.Environ(), "NO_COLOR=1"), b.env...) // NO_COLOR: plain text in the log files
	// A pipe that no one writes to: it closes when this test process dies without running the
	// cleanup, and the launcher then stops lamina.
	// (cmd keeps the writing end and closes it in Wait.)
	if _, err := cmd.StdinPipe(); err != nil {
		return nil, nil, err
	}
	// Own process group, so that the SIGKILL fallback also reaches the processes the backend
	// started (the launcher's lamina).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, nil, fmt.Errorf("start %s: %w", b.bin, err)
	}
	srv := &server{cmd: cmd, exited: make(chan struct{}), logPath: logPath, stopTimeout: b.stopTimeout}
	go func() {
		srv.waitErr = cmd.Wait()
		close(srv.exited)
	}()
	log.G(ctx).Infof("%s pid %d on %s, output in %s", b.name, cmd.Process.Pid, socket, logPath)

	conn, err := srv.dial(ctx, socket)
	if err != nil {
		stopErr := srv.stop()
		return nil, nil, fmt.Errorf("%s did not come up on %s: %v (stop: %v)\n%s", b.name, socket, err, stopErr, srv.logTail())
	}
	sn := proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), b.name)
	cleanup := func() error {
		var errs []string
		if err := conn.Close(); err != nil {
			errs = append(errs, "close grpc connection: "+err.Error())
		}
		// Mounts the case left in its play area (work/, next to root/; the suite's own deferred
		// unmounts ran already): they would hold the backend's filesystems (lamina-rbd: the
		// layer's loop device and rbd-fuse) after it stopped.
		for _, m := range mountsUnder(filepath.Join(filepath.Dir(root), "work")) {
			if err := syscall.Unmount(m, 0); err != nil {
				_ = syscall.Unmount(m, syscall.MNT_DETACH)
			}
			log.G(ctx).Infof("unmounted %s, left mounted by the test case", m)
		}
		if err := srv.stop(); err != nil {
			errs = append(errs, err.Error())
		}
		if m := mountsUnder(root); len(m) > 0 {
			errs = append(errs, fmt.Sprintf("mounts left under the test root after stop: %v", m))
		}
		if len(errs) > 0 {
			return fmt.Errorf("%s: %s\n%s", b.name, strings.Join(errs, "; "), srv.logTail())
		}
		return nil
	}
	return sn, cleanup, nil
}

// dial waits for the socket to accept a connection, or for the process to exit.
func (s *server) dial(ctx context.Context, socket string) (*grpc.ClientConn, error) {
	deadline := time.Now().Add(startTimeout)
	for {
		select {
		case <-s.exited:
			return nil, fmt.Errorf("process exited early: %v", s.waitErr)
		default:
		}
		if c, err := net.DialTimeout("unix", socket, time.Second); err == nil {
			c.Close()
			break
		} else if time.Now().After(deadline) {
			return nil, fmt.Errorf("socket not accepting after %v: %v", startTimeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return snapdial.Dial(ctx, socket)
}

// stop sends SIGTERM to the process (by PID), waits, and falls back to SIGKILL of its process
// group (whose id is that PID). A process that needs SIGKILL or exits non-zero on SIGTERM is
// reported as an error.
func (s *server) stop() error {
	select {
	case <-s.exited:
		return fmt.Errorf("pid %d had already exited: %v", s.cmd.Process.Pid, s.waitErr)
	default:
	}
	if err := s.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("SIGTERM pid %d: %w", s.cmd.Process.Pid, err)
	}
	select {
	case <-s.exited:
		if s.waitErr != nil {
			return fmt.Errorf("pid %d on SIGTERM: %v", s.cmd.Process.Pid, s.waitErr)
		}
		return nil
	case <-time.After(s.stopTimeout):
	}
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	<-s.exited
	return fmt.Errorf("pid %d ignored SIGTERM for %v and was killed", s.cmd.Process.Pid, s.stopTimeout)
}

func (s *server) logTail() string {
	data, err := os.ReadFile(s.logPath)
	if err != nil {
		return "(no server output: " + err.Error() + ")"
	}
	const max = 4000
	if len(data) > max {
		data = data[len(data)-max:]
	}
	return "--- server output (" + s.logPath + ") ---\n" + string(data)
}

// mountsUnder lists mount points of this mount namespace at or below dir.
func mountsUnder(dir string) []string {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var out []string
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMountinfo(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	return out
}

// unescapeMountinfo undoes the octal escapes (\040 for a space...) of /proc/self/mountinfo.
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
