// Package snapdial dials a snapshotter's gRPC unix socket the way containerd dials a proxy plugin;
// shared by the conformance suite and the latency bench.
package snapdial

import (
	"context"
	"net"
	"time"

	"google.golang.org/grpc"
)

// Dial connects to the gRPC server on the unix socket, waiting up to 5 s for it to answer.
func Dial(ctx context.Context, socket string) (*grpc.ClientConn, error) {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return grpc.DialContext(dctx, "unix://"+socket,
		grpc.WithInsecure(),
		grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		}),
	)
}
