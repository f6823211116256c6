// Command embedserve-example calls an embedserve server from Go: a health check, an Embed of
// two texts (as little-endian float32 bytes), a Rerank of three documents, and -concurrent
// goroutines embedding one text each through the coalescing client, which merges them into
// fewer calls (checked against one direct call of the same texts).
//
// It exits 1 on any error, printing the gRPC status code and the google.rpc details the
// server attached (BadRequest field violations, ErrorInfo, RetryInfo). Its last line on
// stdout is a JSON summary.
//
//	embedserve-example -target 127.0.0.1:50051 -timeout 10s -concurrent 16
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/embedserve/embedserve/client/go/embedserve"
	embedservev1 "github.com/embedserve/embedserve/client/go/embedserve/v1"
)

// summary is printed as the last line, for scripts and tests.
type summary struct {
	Health      string    `json:"health"`
	Model       string    `json:"model"`
	Inputs      []string  `json:"inputs"`
	Embeddings  int       `json:"embeddings"`
	Dimensions  int       `json:"dimensions"`
	FirstValues []float32 `json:"first_values"` // of the first embedding
	Reranker    string    `json:"reranker"`
	Query       string    `json:"query"`
	Documents   []string  `json:"documents"`
	TopIndex    uint32    `json:"top_index"`
	Indices     []uint32  `json:"indices"` // documents, best first
	Scores      []float32 `json:"scores"`  // their scores

	// The -concurrent round: callers each embedding one text through the coalescing client.
	Concurrent struct {
		Callers      int     `json:"callers"`
		RPCs         int64   `json:"rpcs"`          // Embed calls that reached the connection
		MaxDiff      float64 `json:"max_diff"`      // largest |merged - direct| over all values
		InputTokens  uint32  `json:"input_tokens"`  // summed over the callers' own Usage
		DirectTokens uint32  `json:"direct_tokens"` // of one direct call of all the texts
	} `json:"concurrent"`
}

// The canonical names of the gRPC status codes (grpc-go prints "Unavailable").
var codeNames = map[codes.Code]string{
	codes.OK: "OK", codes.Canceled: "CANCELLED", codes.Unknown: "UNKNOWN",
	codes.InvalidArgument: "INVALID_ARGUMENT", codes.DeadlineExceeded: "DEADLINE_EXCEEDED",
	codes.NotFound: "NOT_FOUND", codes.AlreadyExists: "ALREADY_EXISTS",
	codes.PermissionDenied: "PERMISSION_DENIED", codes.ResourceExhausted: "RESOURCE_EXHAUSTED",
	codes.FailedPrecondition: "FAILED_PRECONDITION", codes.Aborted: "ABORTED",
	codes.OutOfRange: "OUT_OF_RANGE", codes.Unimplemented: "UNIMPLEMENTED",
	codes.Internal: "INTERNAL", codes.Unavailable: "UNAVAILABLE", codes.DataLoss: "DATA_LOSS",
	codes.Unauthenticated: "UNAUTHENTICATED",
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "server address, host:port")
	timeout := flag.Duration("timeout", 10*time.Second, "deadline for all the calls together")
	query := flag.String("query", "Which animal eats bamboo?", "the rerank query")
	concurrent := flag.Int("concurrent", 16, "goroutines embedding one text each through the coalescing client (0: none)")
	flag.Parse()

	if err := run(*target, *timeout, *query, *concurrent); err != nil {
		report(err)
		os.Exit(1)
	}
}

func run(target string, timeout time.Duration, query string, concurrent int) error {
	// One deadline for the whole run: every call carries what is left of it.
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()

	// Non-blocking dial: a dead address fails the first call with UNAVAILABLE.
	conn, err := grpc.Dial(target, grpc.WithInsecure())
	if err != nil {
		return fmt.Errorf("dial %s: %w", target, err)
	}
	defer conn.Close()

	var out summary

	health, err := grpc_health_v1.NewHealthClient(conn).Check(ctx, &grpc_health_v1.HealthCheckRequest{})
	if err != nil {
		return fmt.Errorf("health check: %w", err)
	}
	out.Health = health.GetStatus().String()
	fmt.Printf("health: %s\n", out.Health)
	if health.GetStatus() != grpc_health_v1.HealthCheckResponse_SERVING {
		return fmt.Errorf("health check: server is %s", out.Health)
	}

	out.Inputs = []string{"The giant panda eats bamboo.", "Koalas sleep most of the day."}
	embedded, err := embedservev1.NewEmbedServiceClient(conn).Embed(ctx, &embedservev1.EmbedRequest{
		Inputs:   out.Inputs,
		Encoding: embedservev1.Encoding_ENCODING_FLOAT32_BYTES,
	})
	if err != nil {
		return fmt.Errorf("embed: %w", err)
	}
	out.Model = embedded.GetModel()
	fmt.Printf("embed: model %s, %d input tokens, %d embeddings\n",
		out.Model, embedded.GetUsage().GetInputTokens(), len(embedded.GetEmbeddings()))
	vectors, err := embedserve.Vectors(embedded)
	if err != nil {
		return fmt.Errorf("embed: %w", err)
	}
	for i, vector := range vectors {
		out.Dimensions = len(vector)
		if i == 0 {
			out.FirstValues = vector[:min(4, len(vector))]
		}
		fmt.Printf("  [%d] %d dimensions: %v ...\n", i, len(vector), vector[:min(4, len(vector))])
	}
	out.Embeddings = len(embedded.GetEmbeddings())

	out.Query = query
	out.Documents = []string{
		"Koalas feed almost only on eucalyptus leaves.",
		"Giant pandas spend most of the day eating bamboo.",
		"Bamboo is a fast-growing grass.",
	}
	ranked, err := embedservev1.NewRerankServiceClient(conn).Rerank(ctx, &embedservev1.RerankRequest{
		Query:     query,
		Documents: out.Documents,
	})
	if err != nil {
		return fmt.Errorf("rerank: %w", err)
	}
	out.Reranker = ranked.GetModel()
	fmt.Printf("rerank: model %s, query %q\n", out.Reranker, query)
	for rank, result := range ranked.GetResults() {
		if int(result.GetIndex()) >= len(out.Documents) {
			return fmt.Errorf("rerank: result index %d out of range", result.GetIndex())
		}
		fmt.Printf("  #%d doc %d score %.4f %q\n", rank+1, result.GetIndex(), result.GetScore(), out.Documents[result.GetIndex()])
		out.Indices = append(out.Indices, result.GetIndex())
		out.Scores = append(out.Scores, result.GetScore())
	}
	if len(ranked.GetResults()) == 0 {
		return errors.New("rerank: no results")
	}
	out.TopIndex = ranked.GetResults()[0].GetIndex()

	if concurrent > 0 {
		if err := embedConcurrently(ctx, conn, concurrent, &out); err != nil {
			return fmt.Errorf("concurrent embed: %w", err)
		}
	}

	line, err := json.Marshal(out)
	if err != nil {
		return err
	}
	fmt.Println(string(line))
	return nil
}

// countingClient counts the Embed calls that reach the connection.
type countingClient struct {
	embedservev1.EmbedServiceClient
	calls atomic.Int64
}

func (c *countingClient) Embed(ctx context.Context, req *embedservev1.EmbedRequest, opts ...grpc.CallOption) (*embedservev1.EmbedResponse, error) {
	c.calls.Add(1)
	return c.EmbedServiceClient.Embed(ctx, req, opts...)
}

// embedConcurrently starts callers goroutines at one moment, each embedding its own text
// through the coalescing client, as the handlers of a Go service would, and checks their
// vectors and usage against one direct call of all the texts.
func embedConcurrently(ctx context.Context, conn *grpc.ClientConn, callers int, out *summary) error {
	direct := embedservev1.NewEmbedServiceClient(conn)
	counted := &countingClient{EmbedServiceClient: direct}
	coalescing := embedserve.NewCoalescingEmbedClient(counted, 0)

	texts := make([]string, callers)
	for i := range texts {
		texts[i] = fmt.Sprintf("Search query %d: where do giant pandas live?", i)
	}
	vectors := make([][]float32, callers)
	errs := make([]error, callers)
	tokens := make([]uint32, callers)
	release := make(chan struct{})
	var done sync.WaitGroup
	for i := range texts {
		done.Add(1)
		go func(i int) {
			defer done.Done()
			<-release
			resp, err := coalescing.Embed(ctx, &embedservev1.EmbedRequest{
				Inputs:   []string{texts[i]},
				Encoding: embedservev1.Encoding_ENCODING_FLOAT32_BYTES,
			})
			if err == nil && len(resp.GetEmbeddings()) != 1 {
				err = fmt.Errorf("%d embeddings for one text", len(resp.GetEmbeddings()))
			}
			if err == nil {
				tokens[i] = resp.GetUsage().GetInputTokens()
				vectors[i], err = embedserve.Vector(resp.GetEmbeddings()[0])
			}
			errs[i] = err
		}(i)
	}
	close(release)
	done.Wait()
	for i, err := range errs {
		if err != nil {
			return fmt.Errorf("caller %d: %w", i, err)
		}
	}

	whole, err := direct.Embed(ctx, &embedservev1.EmbedRequest{
		Inputs:   texts,
		Encoding: embedservev1.Encoding_ENCODING_FLOAT32_BYTES,
	})
	if err != nil {
		return fmt.Errorf("direct call: %w", err)
	}
	expected, err := embedserve.Vectors(whole)
	if err != nil {
		return fmt.Errorf("direct call: %w", err)
	}
	if len(expected) != callers {
		return fmt.Errorf("direct call: %d embeddings for %d texts", len(expected), callers)
	}

	c := &out.Concurrent
	c.Callers, c.RPCs, c.DirectTokens = callers, counted.calls.Load(), whole.GetUsage().GetInputTokens()
	for i := range vectors {
		c.InputTokens += tokens[i]
		if len(vectors[i]) != len(expected[i]) {
			return fmt.Errorf("caller %d: %d dimensions, direct %d", i, len(vectors[i]), len(expected[i]))
		}
		for j := range vectors[i] {
			c.MaxDiff = math.Max(c.MaxDiff, math.Abs(float64(vectors[i][j]-expected[i][j])))
		}
	}
	fmt.Printf("concurrent: %d callers, %d Embed calls, %d input tokens (direct %d), max |diff| %.2g\n",
		callers, c.RPCs, c.InputTokens, c.DirectTokens, c.MaxDiff)
	return nil
}

// report prints the error to stderr, with its gRPC code and status details when it has them.
func report(err error) {
	fmt.Fprintf(os.Stderr, "error: %v\n", err)
	var grpcErr interface{ GRPCStatus() *status.Status }
	if !errors.As(err, &grpcErr) {
		return
	}
	st := grpcErr.GRPCStatus()
	name, known := codeNames[st.Code()]
	if !known {
		name = st.Code().String()
	}
	fmt.Fprintf(os.Stderr, "grpc code: %s (%d): %s\n", name, uint32(st.Code()), st.Message())
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				fmt.Fprintf(os.Stderr, "field violation: %s: %s\n", v.GetField(), v.GetDescription())
			}
		case *errdetails.ErrorInfo:
			fmt.Fprintf(os.Stderr, "error info: reason %s, domain %s\n", d.GetReason(), d.GetDomain())
		case *errdetails.RetryInfo:
			delay := d.GetRetryDelay()
			fmt.Fprintf(os.Stderr, "retry info: retry after %v\n",
				time.Duration(delay.GetSeconds())*time.Second+time.Duration(delay.GetNanos()))
		case error:
			fmt.Fprintf(os.Stderr, "undecodable detail: %v\n", d)
		}
	}
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}
