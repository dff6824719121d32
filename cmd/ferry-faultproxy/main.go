// Command ferry-faultproxy runs the fault-injecting proxy of ferry's test kit (internal/faultproxy) as a process,
// for end-to-end tests: one instance per direction, e.g. between ferry and the homeserver's client API, or
// between the homeserver and ferry's appservice port. It prints its tallies when it stops (SIGINT or SIGTERM);
// while it runs, POST /_faultproxy/off and /_faultproxy/on switch it and GET /_faultproxy/tallies reads them.
// It is a test tool: never put it in front of a production homeserver.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.ferry.im/ferry/internal/faultproxy"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	fs := flag.NewFlagSet("ferry-faultproxy", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	target := fs.String("target", "", "upstream base URL, e.g. http://127.0.0.1:8008")
	name := fs.String("name", "faultproxy", "name in the tallies")
	seed := fs.Uint64("seed", 1, "seed of the fault generator")
	rate := fs.Float64("rate", 0.05, "share of requests that meet a fault (0 to 1)")
	mix := fs.String("faults", "all", `fault mix, "kind=weight,...": 429 429h 500 502 503 504 reset reset-after lost 504-after slow, or all`)
	retryAfter := fs.Duration("retry-after", 500*time.Millisecond, "what rate-limit faults ask the client to wait")
	slowMax := fs.Duration("slow-max", 2*time.Second, "longest delay of a slow answer")
	hold := fs.Duration("hold", 2*time.Second, "how long a lost answer keeps the client waiting")
	forget := fs.Bool("forget-txn", false, "forward sends that meet an after fault under another transaction ID")
	off := fs.Bool("off", false, "start with fault injection switched off")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	m, err := faultproxy.ParseMix(*mix)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ferry-faultproxy: -faults: %v\n", err)
		return 2
	}
	p, err := faultproxy.New(faultproxy.Config{Name: *name, Target: *target, Seed: *seed, Rate: *rate, Mix: m,
		RetryAfter: *retryAfter, SlowMax: *slowMax, Hold: *hold, ForgetTxn: *forget})
	if err != nil {
		fmt.Fprintf(os.Stderr, "ferry-faultproxy: %v\n", err)
		return 2
	}
	if *off {
		p.SetEnabled(false)
	}
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "ferry-faultproxy: %v\n", err)
		return 1
	}
	srv := &http.Server{Handler: p, ReadHeaderTimeout: 30 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = srv.Shutdown(sctx)
	}()
	fmt.Printf("ferry-faultproxy %s: listening on http://%s, forwarding to %s (seed %d, rate %g)\n", *name, l.Addr(), *target, *seed, *rate)
	if err = srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintf(os.Stderr, "ferry-faultproxy: %v\n", err)
		return 1
	}
	fmt.Println(p.Tallies())
	return 0
}
