// Command embedserve-goload is a closed-loop load generator in Go: -callers goroutines each
// embed one text a call, sending the next call when the previous one answers, either on the
// generated client ("raw") or through the client library's CoalescingEmbedClient
// (-coalesce). It measures what a Go service calling embedserve from its request handlers
// sees, and prints one JSON line:
//
//	{"callers":64,"coalesce":true,"calls":3420,"rps":427.5,"tokens_per_s":7390,
//	 "latency_ms":{"p50":..,"p95":..,"p99":..,"mean":..},"errors":{"UNAVAILABLE":2},
//	 "rpcs":61,"client_cpu_ms_per_call":0.04}
//
// Calls are counted when they answer inside the measured window (after -warmup, for
// -duration); latencies are those of the calls counted; errors are counted by gRPC code in
// the window; rpcs is how many Embed calls reached the connection in the window; sent_total
// counts every call sent, the warm-up's included (the server's CPU is shared out over them).
//
//	embedserve-goload -target 127.0.0.1:50051 -callers 64 -duration 8s -coalesce -texts texts.json
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"

	"github.com/embedserve/embedserve/client/go/embedserve"
	embedservev1 "github.com/embedserve/embedserve/client/go/embedserve/v1"
)

type latencies struct {
	P50  float64 `json:"p50"`
	P95  float64 `json:"p95"`
	P99  float64 `json:"p99"`
	Mean float64 `json:"mean"`
}

type report struct {
	Callers          int            `json:"callers"`
	Coalesce         bool           `json:"coalesce"`
	MaxInputs        int            `json:"max_inputs,omitempty"`
	DurationS        float64        `json:"duration_s"`
	Calls            int            `json:"calls"`
	RPS              float64        `json:"rps"`
	Tokens           int64          `json:"tokens"`
	TokensPerS       float64        `json:"tokens_per_s"`
	LatencyMs        latencies      `json:"latency_ms"`
	Errors           map[string]int `json:"errors"`
	RPCs             int64          `json:"rpcs"`
	SentTotal        int64          `json:"sent_total"` // calls sent, the warm-up's included
	ClientCPUMsACall float64        `json:"client_cpu_ms_per_call"`
}

// countingClient counts the Embed calls that reach the connection while counting is on.
type countingClient struct {
	embedservev1.EmbedServiceClient
	counting atomic.Bool
	calls    atomic.Int64
}

func (c *countingClient) Embed(ctx context.Context, req *embedservev1.EmbedRequest, opts ...grpc.CallOption) (*embedservev1.EmbedResponse, error) {
	if c.counting.Load() {
		c.calls.Add(1)
	}
	return c.EmbedServiceClient.Embed(ctx, req, opts...)
}

// callerRecord is one caller's share of the window, merged at the end (no shared lock on
// the hot path).
type callerRecord struct {
	latencies []float64
	tokens    int64
	errors    map[string]int
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "server address, host:port")
	callers := flag.Int("callers", 64, "concurrent callers, each with one call in flight")
	duration := flag.Duration("duration", 8*time.Second, "measured window")
	warmup := flag.Duration("warmup", 2*time.Second, "calls sent before the window, not counted")
	coalesce := flag.Bool("coalesce", false, "call through embedserve.CoalescingEmbedClient")
	maxInputs := flag.Int("max-inputs", embedserve.DefaultMaxInputs, "the coalescing client's merged-call size")
	textsFile := flag.String("texts", "", "a JSON list of texts (default: a few built-in sentences)")
	timeout := flag.Duration("timeout", 30*time.Second, "deadline of each call")
	flag.Parse()

	texts, err := loadTexts(*textsFile)
	if err != nil {
		fmt.Fprintf(os.Stderr, "texts: %v\n", err)
		os.Exit(2)
	}
	conn, err := grpc.Dial(*target, grpc.WithInsecure(),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
	if err != nil {
		fmt.Fprintf(os.Stderr, "dial %s: %v\n", *target, err)
		os.Exit(2)
	}
	defer conn.Close()

	counted := &countingClient{EmbedServiceClient: embedservev1.NewEmbedServiceClient(conn)}
	var client embedservev1.EmbedServiceClient = counted
	if *coalesce {
		client = embedserve.NewCoalescingEmbedClient(counted, *maxInputs)
	}

	start := time.Now()
	windowStart, windowEnd := start.Add(*warmup), start.Add(*warmup+*duration)
	records := make([]callerRecord, *callers)
	var next atomic.Int64 // the next text, shared so that callers do not send the same one;
	// its final value is the number of calls sent
	var cpuAtWindow time.Duration
	var wg sync.WaitGroup
	for i := range records {
		wg.Add(1)
		go func(record *callerRecord) {
			defer wg.Done()
			record.errors = map[string]int{}
			for {
				sent := time.Now()
				if !sent.Before(windowEnd) {
					return
				}
				text := texts[int(next.Add(1))%len(texts)]
				ctx, cancel := context.WithTimeout(context.Background(), *timeout)
				resp, err := client.Embed(ctx, &embedservev1.EmbedRequest{
					Inputs:   []string{text},
					Encoding: embedservev1.Encoding_ENCODING_FLOAT32_BYTES,
				})
				cancel()
				done := time.Now()
				if done.Before(windowStart) || done.After(windowEnd) {
					continue
				}
				if err != nil {
					record.errors[status.Code(err).String()]++
					continue
				}
				record.latencies = append(record.latencies, float64(done.Sub(sent))/float64(time.Millisecond))
				record.tokens += int64(resp.GetUsage().GetInputTokens())
			}
		}(&records[i])
	}
	// The window's RPC count and CPU time start and end with it.
	time.Sleep(time.Until(windowStart))
	cpuAtWindow = cpuTime()
	counted.counting.Store(true)
	time.Sleep(time.Until(windowEnd))
	counted.counting.Store(false)
	cpuInWindow := cpuTime() - cpuAtWindow
	wg.Wait()

	out := report{Callers: *callers, Coalesce: *coalesce, DurationS: duration.Seconds(),
		Errors: map[string]int{}, RPCs: counted.calls.Load(), SentTotal: next.Load()}
	if *coalesce {
		out.MaxInputs = *maxInputs
	}
	var all []float64
	for _, record := range records {
		all = append(all, record.latencies...)
		out.Tokens += record.tokens
		for code, n := range record.errors {
			out.Errors[code] += n
		}
	}
	out.Calls = len(all)
	out.RPS = float64(out.Calls) / duration.Seconds()
	out.TokensPerS = float64(out.Tokens) / duration.Seconds()
	out.LatencyMs = summarize(all)
	if out.Calls > 0 {
		out.ClientCPUMsACall = float64(cpuInWindow) / float64(time.Millisecond) / float64(out.Calls)
	}
	line, err := json.Marshal(out)
	if err != nil {
		fmt.Fprintf(os.Stderr, "report: %v\n", err)
		os.Exit(2)
	}
	fmt.Println(string(line))
}

func loadTexts(path string) ([]string, error) {
	if path == "" {
		return []string{
			"Where do giant pandas live?",
			"How long do koalas sleep each day?",
			"What does a red panda eat in winter?",
			"Which animals eat bamboo?",
		}, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var texts []string
	if err := json.Unmarshal(data, &texts); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(texts) == 0 {
		return nil, fmt.Errorf("%s: no texts", path)
	}
	return texts, nil
}

// cpuTime is the user and system time of this process.
func cpuTime() time.Duration {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &usage); err != nil {
		return 0
	}
	return time.Duration(usage.Utime.Nano() + usage.Stime.Nano())
}

// summarize gives the latency percentiles in milliseconds, interpolated linearly between
// ranks as bench/stats.py does, so that Go and Python loads read alike.
func summarize(values []float64) latencies {
	if len(values) == 0 {
		return latencies{}
	}
	sort.Float64s(values)
	percentile := func(q float64) float64 {
		rank := float64(len(values)-1) * q
		low, high := int(math.Floor(rank)), int(math.Ceil(rank))
		return values[low] + (values[high]-values[low])*(rank-float64(low))
	}
	total := 0.0
	for _, v := range values {
		total += v
	}
	return latencies{P50: percentile(0.50), P95: percentile(0.95), P99: percentile(0.99), Mean: total / float64(len(values))}
}
