// Command embedserve-example calls an embedserve server from Go: a health check, an Embed of
// two texts (as little-endian float32 bytes) and a Rerank of three documents.
//
// It exits 1 on any error, printing the gRPC status code and the google.rpc details the
// server attached (BadRequest field violations, ErrorInfo, RetryInfo). Its last line on
// stdout is a JSON summary.
//
//	embedserve-example -target 127.0.0.1:50051 -timeout 10s
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

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
	flag.Parse()

	if err := run(*target, *timeout, *query); err != nil {
		report(err)
		os.Exit(1)
	}
}

func run(target string, timeout time.Duration, query string) error {
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
	for i, embedding := range embedded.GetEmbeddings() {
		vector, err := decodeFloat32(embedding.GetFloat32Bytes(), int(embedding.GetDimensions()))
		if err != nil {
			return fmt.Errorf("embed: embedding %d: %w", i, err)
		}
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

	line, err := json.Marshal(out)
	if err != nil {
		return err
	}
	fmt.Println(string(line))
	return nil
}

// decodeFloat32 reads little-endian IEEE-754 float32 values, 4 bytes a dimension.
func decodeFloat32(data []byte, dimensions int) ([]float32, error) {
	if len(data)%4 != 0 || len(data)/4 != dimensions {
		return nil, fmt.Errorf("%d bytes for %d dimensions", len(data), dimensions)
	}
	vector := make([]float32, dimensions)
	for i := range vector {
		vector[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[4*i:]))
	}
	return vector, nil
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
