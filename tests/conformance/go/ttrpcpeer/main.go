// Command ttrpcpeer is the reference peer that husk's Python ttrpc is proven
// against. It is built offline from Debian's golang-github-containerd-ttrpc-dev
// (GOPATH mode, GOPATH=/usr/share/gocode) and speaks only well-known protobuf
// types, so neither side needs generated code.
//
// Modes:
//
//	ttrpcpeer server -socket PATH                 serve husk.test.Echo
//	ttrpcpeer client -socket PATH -mode MODE ...  call husk.test.Echo, print JSON lines
//	ttrpcpeer bench-server -socket PATH           same as server
//	ttrpcpeer bench-client -socket PATH -callers N -seconds S
//	ttrpcpeer version                             print the ttrpc feature set
//
// The service husk.test.Echo:
//
//	Echo(BytesValue) -> BytesValue          the request, unchanged
//	Metadata(Empty) -> StringValue          JSON object {key: [values...]} of incoming metadata
//	Sleep(Int64Value ms) -> Int64Value      sleeps ms; the reply is the deadline the server saw,
//	                                        in ms from arrival (-1: none); an expired deadline
//	                                        ends the call with DeadlineExceeded
//	Fail(Int32Value code) -> Empty          always fails: status code, "fail with code N"
//
// The client exits 0 when every line it printed has "ok": true, 1 otherwise,
// 2 on usage errors.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/ttrpc"
	"github.com/gogo/protobuf/types"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

const serviceName = "husk.test.Echo"

// streaming is false: Debian's ttrpc 1.1.1 has no stream support (added in 1.2).
const streaming = false

func emit(v map[string]interface{}) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	os.Stdout.Write(append(b, '\n'))
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: ttrpcpeer {server|client|bench-server|bench-client|version} [flags]")
		os.Exit(2)
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "server", "bench-server":
		os.Exit(runServer(os.Args[1], args))
	case "client":
		os.Exit(runClient(args))
	case "bench-client":
		os.Exit(runBenchClient(args))
	case "version":
		emit(map[string]interface{}{"ttrpc": "debian golang-github-containerd-ttrpc-dev", "streaming": streaming,
			"max_message": 4 << 20})
	default:
		fmt.Fprintf(os.Stderr, "ttrpcpeer: unknown mode %q\n", os.Args[1])
		os.Exit(2)
	}
}

// ---------------------------------------------------------------- server

func echoMethods() map[string]ttrpc.Method {
	return map[string]ttrpc.Method{
		"Echo": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req types.BytesValue
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return &req, nil
		},
		"Metadata": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req types.Empty
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			out := map[string][]string{}
			if md, ok := ttrpc.GetMetadata(ctx); ok {
				for k, v := range md {
					out[k] = v
				}
			}
			b, err := json.Marshal(out)
			if err != nil {
				return nil, err
			}
			return &types.StringValue{Value: string(b)}, nil
		},
		"Sleep": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req types.Int64Value
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			seen := int64(-1)
			if dl, ok := ctx.Deadline(); ok {
				seen = time.Until(dl).Milliseconds()
			}
			t := time.NewTimer(time.Duration(req.Value) * time.Millisecond)
			defer t.Stop()
			select {
			case <-t.C:
				return &types.Int64Value{Value: seen}, nil
			case <-ctx.Done():
				if errors.Is(ctx.Err(), context.DeadlineExceeded) {
					return nil, status.Errorf(codes.DeadlineExceeded, "sleep: deadline exceeded")
				}
				return nil, status.Errorf(codes.Canceled, "sleep: %v", ctx.Err())
			}
		},
		"Fail": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var req types.Int32Value
			if err := unmarshal(&req); err != nil {
				return nil, err
			}
			return nil, status.Errorf(codes.Code(req.Value), "fail with code %d", req.Value)
		},
	}
}

func runServer(name string, args []string) int {
	fs := flag.NewFlagSet(name, flag.ExitOnError)
	socket := fs.String("socket", "", "unix socket path to listen on")
	sameUser := fs.Bool("require-same-user", true, "use ttrpc.UnixSocketRequireSameUser as containerd's shims do")
	fs.Parse(args)
	if *socket == "" {
		fmt.Fprintln(os.Stderr, "server: -socket is required")
		return 2
	}
	var opts []ttrpc.ServerOpt
	if *sameUser {
		opts = append(opts, ttrpc.WithServerHandshaker(ttrpc.UnixSocketRequireSameUser()))
	}
	srv, err := ttrpc.NewServer(opts...)
	if err != nil {
		fmt.Fprintln(os.Stderr, "server:", err)
		return 1
	}
	srv.Register(serviceName, echoMethods())
	os.Remove(*socket)
	l, err := net.Listen("unix", *socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, "server:", err)
		return 1
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		srv.Close()
	}()
	emit(map[string]interface{}{"listening": *socket, "service": serviceName, "pid": os.Getpid()})
	err = srv.Serve(ctx, l)
	os.Remove(*socket)
	if err != nil && !errors.Is(err, ttrpc.ErrServerClosed) {
		fmt.Fprintln(os.Stderr, "server:", err)
		return 1
	}
	return 0
}

// ---------------------------------------------------------------- client

func dial(socket string, opts ...ttrpc.ClientOpts) (*ttrpc.Client, error) {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		return nil, err
	}
	return ttrpc.NewClient(conn, opts...), nil
}

// remoteTimeout sends timeout_nano = d on every call but leaves the local
// context without a deadline, so only the server can end the call: this is how
// a test sees that a server enforces the deadline it was sent.
func remoteTimeout(d time.Duration) ttrpc.ClientOpts {
	return ttrpc.WithUnaryClientInterceptor(func(ctx context.Context, req *ttrpc.Request, resp *ttrpc.Response,
		info *ttrpc.UnaryClientInfo, invoker ttrpc.Invoker) error {
		if info.FullMethod == "/"+serviceName+"/Sleep" {
			req.TimeoutNano = d.Nanoseconds()
		}
		return invoker(ctx, req, resp)
	})
}

// statusFields describes an RPC error the way the Python side compares it.
func statusFields(err error) map[string]interface{} {
	if st, ok := status.FromError(err); ok {
		return map[string]interface{}{"code": int(st.Code()), "code_name": st.Code().String(), "message": st.Message()}
	}
	if errors.Is(err, context.DeadlineExceeded) {
		// the client's own deadline fired before the reply came
		return map[string]interface{}{"code": int(codes.DeadlineExceeded), "code_name": "DeadlineExceeded",
			"message": err.Error(), "local": true}
	}
	return map[string]interface{}{"code": -1, "code_name": "transport", "message": err.Error()}
}

type kvFlag []string

func (k *kvFlag) String() string     { return strings.Join(*k, ",") }
func (k *kvFlag) Set(v string) error { *k = append(*k, v); return nil }

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7) + seed
	}
	return b
}

func runClient(args []string) int {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	socket := fs.String("socket", "", "unix socket path of the ttrpc server")
	mode := fs.String("mode", "echo", "echo|metadata|deadline|error|large|concurrent|unknown")
	data := fs.String("data", "hello from go", "echo: payload")
	var md kvFlag
	fs.Var(&md, "md", "metadata: key=value (repeatable)")
	timeoutMs := fs.Int("timeout-ms", 200, "deadline: call timeout")
	sleepMs := fs.Int("sleep-ms", 2000, "deadline: how long the server is asked to sleep")
	code := fs.Int("code", int(codes.NotFound), "error: status code the server is asked to fail with")
	size := fs.Int("size", 4<<20-1024, "large: payload bytes")
	callers := fs.Int("callers", 16, "concurrent: goroutines sharing one connection")
	calls := fs.Int("calls", 64, "concurrent: calls per goroutine")
	serverOnly := fs.Bool("server-only", false,
		"deadline: send the timeout but set no local deadline, so only the server can enforce it")
	fs.Parse(args)
	if *socket == "" {
		fmt.Fprintln(os.Stderr, "client: -socket is required")
		return 2
	}
	var opts []ttrpc.ClientOpts
	if *serverOnly {
		opts = append(opts, remoteTimeout(time.Duration(*timeoutMs)*time.Millisecond))
	}
	c, err := dial(*socket, opts...)
	if err != nil {
		emit(map[string]interface{}{"mode": *mode, "ok": false, "error": err.Error()})
		return 1
	}
	defer c.Close()
	ctx := context.Background()
	out := map[string]interface{}{"mode": *mode}
	switch *mode {
	case "echo":
		var resp types.BytesValue
		err = c.Call(ctx, serviceName, "Echo", &types.BytesValue{Value: []byte(*data)}, &resp)
		if err != nil {
			out["error"] = statusFields(err)
		}
		out["data"] = string(resp.Value)
		out["ok"] = err == nil && string(resp.Value) == *data
	case "metadata":
		m := ttrpc.MD{}
		for _, kv := range md {
			parts := strings.SplitN(kv, "=", 2)
			if len(parts) != 2 {
				fmt.Fprintf(os.Stderr, "client: bad -md %q\n", kv)
				return 2
			}
			m.Append(parts[0], parts[1])
		}
		var resp types.StringValue
		err = c.Call(ttrpc.WithMetadata(ctx, m), serviceName, "Metadata", &types.Empty{}, &resp)
		got := map[string][]string{}
		if err == nil {
			err = json.Unmarshal([]byte(resp.Value), &got)
		}
		if err != nil {
			out["error"] = statusFields(err)
		}
		out["metadata"] = got
		ok := err == nil
		for k, want := range m {
			if fmt.Sprint(got[k]) != fmt.Sprint(want) {
				ok = false
			}
		}
		out["ok"] = ok
	case "deadline":
		cctx, cancel := context.WithTimeout(ctx, time.Duration(*timeoutMs)*time.Millisecond)
		if *serverOnly {
			cctx, cancel = context.WithCancel(ctx)
		}
		start := time.Now()
		var resp types.Int64Value
		err = c.Call(cctx, serviceName, "Sleep", &types.Int64Value{Value: int64(*sleepMs)}, &resp)
		cancel()
		out["elapsed_ms"] = time.Since(start).Milliseconds()
		if err != nil {
			out["error"] = statusFields(err)
			_, isStatus := status.FromError(err)
			out["ok"] = status.Code(err) == codes.DeadlineExceeded ||
				(!*serverOnly && !isStatus && errors.Is(err, context.DeadlineExceeded))
		} else {
			out["deadline_seen_ms"] = resp.Value
			// finishing is right only when the sleep was shorter than the timeout
			out["ok"] = *sleepMs < *timeoutMs && resp.Value > 0 && resp.Value <= int64(*timeoutMs)
		}
		// the connection must still work after a deadline
		var e types.BytesValue
		if err2 := c.Call(ctx, serviceName, "Echo", &types.BytesValue{Value: []byte("after")}, &e); err2 != nil ||
			string(e.Value) != "after" {
			out["ok"] = false
			out["after_error"] = fmt.Sprint(err2)
		}
	case "error":
		var resp types.Empty
		err = c.Call(ctx, serviceName, "Fail", &types.Int32Value{Value: int32(*code)}, &resp)
		if err == nil {
			out["ok"] = false
		} else {
			f := statusFields(err)
			out["error"] = f
			out["ok"] = f["code"] == *code && f["message"] == fmt.Sprintf("fail with code %d", *code)
		}
	case "unknown":
		var resp types.Empty
		err = c.Call(ctx, serviceName, "NoSuchMethod", &types.Empty{}, &resp)
		if err == nil {
			out["ok"] = false
		} else {
			f := statusFields(err)
			out["error"] = f
			out["ok"] = f["code"] == int(codes.Unimplemented) || f["code"] == int(codes.NotFound)
		}
	case "large":
		payload := pattern(*size, 3)
		var resp types.BytesValue
		start := time.Now()
		err = c.Call(ctx, serviceName, "Echo", &types.BytesValue{Value: payload}, &resp)
		out["elapsed_ms"] = time.Since(start).Milliseconds()
		out["size"] = *size
		if err != nil {
			out["error"] = statusFields(err)
		}
		out["received"] = len(resp.Value)
		out["ok"] = err == nil && bytes.Equal(resp.Value, payload)
	case "concurrent":
		var wg sync.WaitGroup
		var bad, good int64
		var firstErr atomic.Value
		start := time.Now()
		for g := 0; g < *callers; g++ {
			wg.Add(1)
			go func(g int) {
				defer wg.Done()
				for i := 0; i < *calls; i++ {
					want := []byte(fmt.Sprintf("caller %d call %d %s", g, i, strings.Repeat("x", (g*31+i)%500)))
					var resp types.BytesValue
					if err := c.Call(ctx, serviceName, "Echo", &types.BytesValue{Value: want}, &resp); err != nil {
						firstErr.CompareAndSwap(nil, err.Error())
						atomic.AddInt64(&bad, 1)
					} else if !bytes.Equal(resp.Value, want) {
						firstErr.CompareAndSwap(nil, "mismatched reply")
						atomic.AddInt64(&bad, 1)
					} else {
						atomic.AddInt64(&good, 1)
					}
				}
			}(g)
		}
		wg.Wait()
		out["elapsed_ms"] = time.Since(start).Milliseconds()
		out["callers"] = *callers
		out["calls"] = good + bad
		out["good"] = good
		if e := firstErr.Load(); e != nil {
			out["error"] = e
		}
		out["ok"] = bad == 0 && good == int64(*callers**calls)
	default:
		fmt.Fprintf(os.Stderr, "client: unknown -mode %q\n", *mode)
		return 2
	}
	emit(out)
	if out["ok"] == true {
		return 0
	}
	return 1
}

// ---------------------------------------------------------------- bench

func runBenchClient(args []string) int {
	fs := flag.NewFlagSet("bench-client", flag.ExitOnError)
	socket := fs.String("socket", "", "unix socket path of the ttrpc server")
	callers := fs.Int("callers", 1, "concurrent callers on one connection")
	seconds := fs.Float64("seconds", 3, "measurement time")
	size := fs.Int("size", 16, "payload bytes")
	warmup := fs.Float64("warmup", 0.3, "seconds of calls before measuring")
	fs.Parse(args)
	if *socket == "" {
		fmt.Fprintln(os.Stderr, "bench-client: -socket is required")
		return 2
	}
	c, err := dial(*socket)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench-client:", err)
		return 1
	}
	defer c.Close()
	payload := pattern(*size, 1)
	var counting int32
	var n int64
	var failed atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for g := 0; g < *callers; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx := context.Background()
			for {
				select {
				case <-stop:
					return
				default:
				}
				var resp types.BytesValue
				if err := c.Call(ctx, serviceName, "Echo", &types.BytesValue{Value: payload}, &resp); err != nil {
					failed.CompareAndSwap(nil, err.Error())
					return
				}
				if atomic.LoadInt32(&counting) == 1 {
					atomic.AddInt64(&n, 1)
				}
			}
		}()
	}
	time.Sleep(time.Duration(*warmup * float64(time.Second)))
	atomic.StoreInt32(&counting, 1)
	start := time.Now()
	time.Sleep(time.Duration(*seconds * float64(time.Second)))
	calls := atomic.LoadInt64(&n)
	elapsed := time.Since(start).Seconds()
	close(stop)
	wg.Wait()
	if e := failed.Load(); e != nil {
		fmt.Fprintln(os.Stderr, "bench-client:", e)
		return 1
	}
	emit(map[string]interface{}{"calls": calls, "seconds": elapsed, "rate": float64(calls) / elapsed,
		"callers": *callers, "size": *size})
	return 0
}
