package embedserve

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	embedservev1 "github.com/embedserve/embedserve/client/go/embedserve/v1"
)

// scripted is a real gRPC server on loopback whose answers follow from the texts:
//   - each text's vector is [its length, its first byte], its input_tokens its length;
//     "long..." texts are truncated and "cached..." ones cached;
//   - a text "bad" is an INVALID_ARGUMENT naming its index; dimensions 999 one naming the
//     option;
//   - a request with a text starting "block" waits until release is closed or it ends;
//   - with maxInputs set, a request of more texts is an INVALID_ARGUMENT naming "inputs".
type scripted struct {
	embedservev1.UnimplementedEmbedServiceServer

	release chan struct{}

	mu        sync.Mutex
	requests  []seen
	maxInputs int
}

type seen struct {
	inputs   []string
	deadline time.Time
	tenant   []string
	ended    chan struct{} // closed when the call's context ends
}

func (s *scripted) Embed(ctx context.Context, req *embedservev1.EmbedRequest) (*embedservev1.EmbedResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	deadline, _ := ctx.Deadline()
	record := seen{inputs: req.GetInputs(), deadline: deadline, tenant: md.Get("tenant"), ended: make(chan struct{})}
	go func() { <-ctx.Done(); close(record.ended) }()
	s.mu.Lock()
	s.requests = append(s.requests, record)
	s.mu.Unlock()

	if req.GetDimensions() == 999 {
		return nil, invalid("dimensions")
	}
	s.mu.Lock()
	limit := s.maxInputs
	s.mu.Unlock()
	if limit > 0 && len(req.GetInputs()) > limit {
		return nil, invalid("inputs")
	}
	for i, text := range req.GetInputs() {
		if text == "bad" {
			return nil, invalid(fmt.Sprintf("inputs[%d]", i))
		}
		if strings.HasPrefix(text, "block") {
			select {
			case <-s.release:
			case <-ctx.Done():
				return nil, status.FromContextError(ctx.Err()).Err()
			}
		}
	}
	resp := &embedservev1.EmbedResponse{
		Model:  "scripted",
		Timing: &embedservev1.Timing{Total: durationpb.New(3 * time.Millisecond)},
	}
	for _, text := range req.GetInputs() {
		resp.Embeddings = append(resp.Embeddings, &embedservev1.Embedding{
			Vector: &embedservev1.Embedding_Float32{Float32: &embedservev1.FloatVector{
				Values: []float32{float32(len(text)), float32(text[0])},
			}},
			Dimensions:  2,
			InputTokens: uint32(len(text)),
			Truncated:   strings.HasPrefix(text, "long"),
			Cached:      strings.HasPrefix(text, "cached"),
		})
	}
	// The totals as the server reports them, beside the per-input fields merging sums.
	resp.Usage = callerResponse(resp, resp.Embeddings).Usage
	return resp, nil
}

func invalid(field string) error {
	s, err := status.New(codes.InvalidArgument, field+" is not acceptable").WithDetails(
		&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{
			{Field: field, Description: "not acceptable"},
		}})
	if err != nil {
		panic(err)
	}
	return s.Err()
}

func (s *scripted) seen() []seen {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]seen(nil), s.requests...)
}

// start serves a scripted server on 127.0.0.1 and returns a coalescing client of it.
func start(t *testing.T, maxInputs int) (*scripted, *CoalescingEmbedClient) {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	server := grpc.NewServer()
	script := &scripted{release: make(chan struct{})}
	embedservev1.RegisterEmbedServiceServer(server, script)
	go func() { _ = server.Serve(listener) }()
	conn, err := grpc.Dial(listener.Addr().String(), grpc.WithInsecure())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		server.Stop()
	})
	return script, NewCoalescingEmbedClient(embedservev1.NewEmbedServiceClient(conn), maxInputs)
}

// holdFirstFlush makes the client's first flush wait until n callers are waiting, so that
// which calls merge does not depend on the scheduler.
func holdFirstFlush(c *CoalescingEmbedClient, n int) {
	var once sync.Once
	c.beforeFlush = func() {
		once.Do(func() {
			for queuedCallers(c) < n {
				time.Sleep(time.Millisecond)
			}
		})
	}
}

type answer struct {
	resp *embedservev1.EmbedResponse
	err  error
}

// embedAll calls Embed once for each request, all at once, and returns the answers in order.
func embedAll(ctx context.Context, c *CoalescingEmbedClient, reqs []*embedservev1.EmbedRequest) []answer {
	answers := make([]answer, len(reqs))
	var wg sync.WaitGroup
	for i, req := range reqs {
		wg.Add(1)
		go func(i int, req *embedservev1.EmbedRequest) {
			defer wg.Done()
			resp, err := c.Embed(ctx, req)
			answers[i] = answer{resp, err}
		}(i, req)
	}
	wg.Wait()
	return answers
}

func texts(inputs ...string) *embedservev1.EmbedRequest {
	return &embedservev1.EmbedRequest{Inputs: inputs}
}

// checkOwn fails unless resp holds exactly the rows and usage of inputs.
func checkOwn(t *testing.T, inputs []string, resp *embedservev1.EmbedResponse) {
	t.Helper()
	if len(resp.GetEmbeddings()) != len(inputs) {
		t.Fatalf("%v: %d embeddings", inputs, len(resp.GetEmbeddings()))
	}
	var tokens, truncated, cached uint32
	for i, text := range inputs {
		values := resp.Embeddings[i].GetFloat32().GetValues()
		if len(values) != 2 || values[0] != float32(len(text)) || values[1] != float32(text[0]) {
			t.Fatalf("%v: row %d is %v, not %q's", inputs, i, values, text)
		}
		tokens += uint32(len(text))
		if strings.HasPrefix(text, "long") {
			truncated++
		}
		if strings.HasPrefix(text, "cached") {
			cached++
		}
	}
	usage := resp.GetUsage()
	if usage.GetInputs() != uint32(len(inputs)) || usage.GetInputTokens() != tokens ||
		usage.GetTruncatedInputs() != truncated || usage.GetCachedInputs() != cached {
		t.Fatalf("%v: usage %v, want %d inputs, %d tokens, %d truncated, %d cached",
			inputs, usage, len(inputs), tokens, truncated, cached)
	}
	if resp.GetModel() != "scripted" || resp.GetTiming().GetTotal().AsDuration() != 3*time.Millisecond {
		t.Fatalf("%v: model %q, timing %v", inputs, resp.GetModel(), resp.GetTiming())
	}
}

func TestConcurrentCallersShareOneCallAndGetTheirOwnRows(t *testing.T) {
	script, client := start(t, 64)
	var reqs []*embedservev1.EmbedRequest
	for i := 0; i < 20; i++ {
		if i%3 == 0 {
			reqs = append(reqs, texts(fmt.Sprintf("long text %d", i), fmt.Sprintf("cached %d", i)))
		} else {
			reqs = append(reqs, texts(strings.Repeat("w", i+1)))
		}
	}
	holdFirstFlush(client, len(reqs))
	for i, a := range embedAll(context.Background(), client, reqs) {
		if a.err != nil {
			t.Fatalf("caller %d: %v", i, a.err)
		}
		checkOwn(t, reqs[i].Inputs, a.resp)
	}
	if got := len(script.seen()); got != 1 {
		t.Fatalf("the server saw %d calls for 20 concurrent callers, want 1", got)
	}
}

func TestALoneCallerIsSentAtOnce(t *testing.T) {
	script, client := start(t, 64)
	for i := 0; i < 3; i++ { // one after another: nothing to wait for
		resp, err := client.Embed(context.Background(), texts("solo"))
		if err != nil {
			t.Fatal(err)
		}
		checkOwn(t, []string{"solo"}, resp)
	}
	if got := len(script.seen()); got != 3 {
		t.Fatalf("the server saw %d calls, want 3", got)
	}
}

func TestAServerThatTakesFewerTextsACallAnswersEveryCaller(t *testing.T) {
	script, client := start(t, 64)
	script.mu.Lock()
	script.maxInputs = 3
	script.mu.Unlock()
	var sizes []int
	for round := 0; round < 3; round++ {
		var reqs []*embedservev1.EmbedRequest
		for i := 0; i < 8; i++ {
			reqs = append(reqs, texts(fmt.Sprintf("r%d caller %d", round, i)))
		}
		before := len(script.seen())
		holdFirstFlush(client, len(reqs))
		for i, a := range embedAll(context.Background(), client, reqs) {
			if a.err != nil {
				t.Fatalf("round %d caller %d: %v", round, i, a.err)
			}
			checkOwn(t, reqs[i].Inputs, a.resp)
		}
		largest := 0
		for _, s := range script.seen()[before:] {
			if len(s.inputs) > largest {
				largest = len(s.inputs)
			}
		}
		sizes = append(sizes, largest)
	}
	// 8 merged and refused, then alone (4 from then on); calls of 4, refused, then alone
	// (2 from then on); calls of 2, which fit.
	if sizes[0] != 8 || sizes[1] != 4 || sizes[2] != 2 || client.MaxInputs() != 2 {
		t.Fatalf("largest calls by round %v, MaxInputs %d; want [8 4 2] and 2", sizes, client.MaxInputs())
	}
}

type callerKey struct{}

func TestAMergedCallGoesThroughItsWrapperWithEveryCallersContext(t *testing.T) {
	script, plain := start(t, 64)
	var wrapped [][]string
	var mu sync.Mutex
	client := NewCoalescingEmbedClient(plain.next, 64, WithMergedCall(
		func(ctx context.Context, callers []context.Context, send func(context.Context) error) error {
			var names []string
			for _, caller := range callers {
				names = append(names, caller.Value(callerKey{}).(string))
			}
			mu.Lock()
			wrapped = append(wrapped, names)
			mu.Unlock()
			return send(metadata.AppendToOutgoingContext(ctx, "tenant", "from-wrapper"))
		}))
	holdFirstFlush(client, 3)
	var wg sync.WaitGroup
	answers := make([]answer, 3)
	for i := range answers {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			name := fmt.Sprintf("caller %d", i)
			ctx := context.WithValue(context.Background(), callerKey{}, name)
			resp, err := client.Embed(ctx, texts(name))
			answers[i] = answer{resp, err}
		}(i)
	}
	wg.Wait()
	for i, a := range answers {
		if a.err != nil {
			t.Fatalf("caller %d: %v", i, a.err)
		}
		checkOwn(t, []string{fmt.Sprintf("caller %d", i)}, a.resp)
	}
	seen := script.seen()
	if len(wrapped) != 1 || len(wrapped[0]) != 3 || len(seen) != 1 {
		t.Fatalf("wrapper saw %v, server %d calls; want one merged call of 3 callers", wrapped, len(seen))
	}
	if strings.Join(seen[0].tenant, ",") != "from-wrapper" {
		t.Fatalf("the server saw tenant %v, not the wrapper's context", seen[0].tenant)
	}
	for i, name := range wrapped[0] {
		if name != seen[0].inputs[i] {
			t.Fatalf("callers' contexts %v, inputs %v: not in the call's order", wrapped[0], seen[0].inputs)
		}
	}

	// A wrapper that does not send fails the callers instead of leaving them waiting.
	idle := NewCoalescingEmbedClient(plain.next, 64, WithMergedCall(
		func(context.Context, []context.Context, func(context.Context) error) error { return nil }))
	_, err := idle.Embed(context.Background(), texts("x"))
	if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "without sending") {
		t.Fatalf("a wrapper that did not send: %v, want INTERNAL saying so", err)
	}
}

func TestMergedCallsHoldAtMostMaxInputsAndNeverSplitACaller(t *testing.T) {
	script, client := start(t, 5)
	var reqs []*embedservev1.EmbedRequest
	for i := 0; i < 6; i++ {
		reqs = append(reqs, texts(fmt.Sprintf("a%d", i), fmt.Sprintf("b%d", i)))
	}
	holdFirstFlush(client, len(reqs))
	for i, a := range embedAll(context.Background(), client, reqs) {
		if a.err != nil {
			t.Fatalf("caller %d: %v", i, a.err)
		}
		checkOwn(t, reqs[i].Inputs, a.resp)
	}
	total := 0
	for _, s := range script.seen() {
		if len(s.inputs) > 5 || len(s.inputs)%2 != 0 {
			t.Fatalf("a merged call of %d inputs (max 5, callers of 2): %v", len(s.inputs), s.inputs)
		}
		for i := 0; i < len(s.inputs); i += 2 { // a caller's texts stay together
			if s.inputs[i][1:] != s.inputs[i+1][1:] {
				t.Fatalf("a caller was split: %v", s.inputs)
			}
		}
		total += len(s.inputs)
	}
	if got := len(script.seen()); got != 3 || total != 12 {
		t.Fatalf("%d calls of %d inputs in all, want 3 calls of 12", got, total)
	}
}

func TestCallsWithOtherOptionsOrMetadataAreNotMerged(t *testing.T) {
	script, client := start(t, 64)
	eight, sixteen := uint32(8), uint32(16)
	reqs := []*embedservev1.EmbedRequest{
		{Inputs: []string{"x1"}, Dimensions: &eight},
		{Inputs: []string{"x2"}, Dimensions: &eight},
		{Inputs: []string{"y"}, Dimensions: &sixteen},
		{Inputs: []string{"z"}, Dimensions: &eight},
	}
	holdFirstFlush(client, len(reqs))
	answers := make([]answer, len(reqs))
	var wg sync.WaitGroup
	for i, req := range reqs {
		ctx := context.Background()
		if i == 3 {
			ctx = metadata.AppendToOutgoingContext(ctx, "tenant", "b")
		}
		wg.Add(1)
		go func(i int, ctx context.Context, req *embedservev1.EmbedRequest) {
			defer wg.Done()
			resp, err := client.Embed(ctx, req)
			answers[i] = answer{resp, err}
		}(i, ctx, req)
	}
	wg.Wait()
	for i, a := range answers {
		if a.err != nil {
			t.Fatalf("caller %d: %v", i, a.err)
		}
		checkOwn(t, reqs[i].Inputs, a.resp)
	}
	calls := map[string][]string{}
	for _, s := range script.seen() {
		calls[strings.Join(s.inputs, ",")] = s.tenant
	}
	want := map[string][]string{"x1,x2": nil, "y": nil, "z": {"b"}}
	if len(calls) != len(want) {
		t.Fatalf("calls %v, want %v", calls, want)
	}
	for inputs, tenant := range want {
		got, ok := calls[inputs]
		if !ok && inputs == "x1,x2" {
			got, ok = calls["x2,x1"]
		}
		if !ok || strings.Join(got, ",") != strings.Join(tenant, ",") {
			t.Fatalf("calls %v, want %v", calls, want)
		}
	}
}

func violationField(t *testing.T, err error) string {
	t.Helper()
	s := status.Convert(err)
	if s.Code() != codes.InvalidArgument {
		t.Fatalf("want INVALID_ARGUMENT, got %v", err)
	}
	for _, detail := range s.Details() {
		if bad, ok := detail.(*errdetails.BadRequest); ok && len(bad.GetFieldViolations()) > 0 {
			return bad.GetFieldViolations()[0].GetField()
		}
	}
	t.Fatalf("no BadRequest in %v", err)
	return ""
}

func TestAnInputsErrorReachesOnlyItsCallerWithItsOwnIndex(t *testing.T) {
	script, client := start(t, 64)
	reqs := []*embedservev1.EmbedRequest{texts("a"), texts("b", "bad"), texts("c")}
	holdFirstFlush(client, len(reqs))
	answers := embedAll(context.Background(), client, reqs)
	if got := violationField(t, answers[1].err); got != "inputs[1]" {
		t.Fatalf("the bad caller's violation names %q, want its own inputs[1]", got)
	}
	for _, i := range []int{0, 2} {
		if answers[i].err != nil {
			t.Fatalf("caller %d failed for another caller's input: %v", i, answers[i].err)
		}
		checkOwn(t, reqs[i].Inputs, answers[i].resp)
	}
	if got := len(script.seen()); got != 4 {
		t.Fatalf("the server saw %d calls, want the merged one and 3 alone", got)
	}
}

func TestAnOptionsErrorReachesEveryCaller(t *testing.T) {
	script, client := start(t, 64)
	bad := uint32(999)
	reqs := []*embedservev1.EmbedRequest{
		{Inputs: []string{"a"}, Dimensions: &bad}, {Inputs: []string{"b"}, Dimensions: &bad},
	}
	holdFirstFlush(client, len(reqs))
	for i, a := range embedAll(context.Background(), client, reqs) {
		if got := violationField(t, a.err); got != "dimensions" {
			t.Fatalf("caller %d: violation names %q", i, got)
		}
	}
	if got := len(script.seen()); got != 1 {
		t.Fatalf("the server saw %d calls, want 1", got)
	}
}

func TestACallerThatLeavesLeavesTheOthersTheirCall(t *testing.T) {
	script, client := start(t, 64)
	holdFirstFlush(client, 2)
	leaving, leave := context.WithCancel(context.Background())
	left := make(chan error, 1)
	go func() {
		_, err := client.Embed(leaving, texts("block a"))
		left <- err
	}()
	stayed := make(chan answer, 1)
	go func() {
		resp, err := client.Embed(context.Background(), texts("b"))
		stayed <- answer{resp, err}
	}()
	waitForCalls(t, script, 1)
	leave()
	if err := <-left; status.Code(err) != codes.Canceled {
		t.Fatalf("the caller that left got %v, want CANCELLED", err)
	}
	select {
	case <-script.seen()[0].ended:
		t.Fatal("the merged call ended while a caller still waited for it")
	case <-time.After(50 * time.Millisecond):
	}
	close(script.release)
	a := <-stayed
	if a.err != nil {
		t.Fatal(a.err)
	}
	checkOwn(t, []string{"b"}, a.resp)
}

func TestTheMergedCallIsCancelledWhenEveryCallerHasLeft(t *testing.T) {
	script, client := start(t, 64)
	holdFirstFlush(client, 2)
	ctx, cancel := context.WithCancel(context.Background())
	errs := make(chan error, 2)
	for _, text := range []string{"block a", "block b"} {
		go func(text string) {
			_, err := client.Embed(ctx, texts(text))
			errs <- err
		}(text)
	}
	waitForCalls(t, script, 1)
	cancel()
	for i := 0; i < 2; i++ {
		if err := <-errs; status.Code(err) != codes.Canceled {
			t.Fatalf("got %v, want CANCELLED", err)
		}
	}
	select {
	case <-script.seen()[0].ended:
	case <-time.After(10 * time.Second):
		t.Fatal("the merged call went on after all its callers had left")
	}
}

func TestTheMergedCallCarriesTheLatestDeadline(t *testing.T) {
	script, client := start(t, 64)
	holdFirstFlush(client, 2)
	soon, cancelSoon := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancelSoon()
	later, cancelLater := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancelLater()
	done := make(chan error, 2)
	for _, ctx := range []context.Context{soon, later} {
		go func(ctx context.Context) {
			_, err := client.Embed(ctx, texts("d"))
			done <- err
		}(ctx)
	}
	for i := 0; i < 2; i++ {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	calls := script.seen()
	latest, _ := later.Deadline()
	if len(calls) != 1 || calls[0].deadline.Before(latest.Add(-time.Second)) {
		t.Fatalf("calls %d, deadline %v; want one call with the later deadline %v", len(calls), calls[0].deadline, latest)
	}
}

func TestCallsItCannotMergeAreSentAsTheyAre(t *testing.T) {
	script, client := start(t, 2)
	if _, err := client.Embed(context.Background(), texts()); err != nil {
		t.Fatal(err)
	}
	resp, err := client.Embed(context.Background(), texts("p", "q", "r"))
	if err != nil {
		t.Fatal(err)
	}
	checkOwn(t, []string{"p", "q", "r"}, resp)
	resp, err = client.Embed(context.Background(), texts("w"), grpc.WaitForReady(true))
	if err != nil {
		t.Fatal(err)
	}
	checkOwn(t, []string{"w"}, resp)
	if got := len(script.seen()); got != 3 {
		t.Fatalf("the server saw %d calls, want 3", got)
	}
	done, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := client.Embed(done, texts("x")); status.Code(err) != codes.Canceled {
		t.Fatalf("a call on an ended context got %v, want CANCELLED", err)
	}
}

func waitForCalls(t *testing.T, script *scripted, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(script.seen()) < n {
		if time.Now().After(deadline) {
			t.Fatalf("the server saw %d calls after 10 s, want %d", len(script.seen()), n)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestACallerThatLeavesBeforeTheFlushIsNotSent(t *testing.T) {
	script, client := start(t, 64)
	gate := make(chan struct{})
	client.beforeFlush = func() { <-gate }
	leaving, leave := context.WithCancel(context.Background())
	left := make(chan error, 1)
	go func() {
		_, err := client.Embed(leaving, texts("gone"))
		left <- err
	}()
	waitQueued(t, client, 1)
	leave()
	if err := <-left; status.Code(err) != codes.Canceled {
		t.Fatalf("the caller that left got %v, want CANCELLED", err)
	}
	stayed := make(chan answer, 1)
	go func() {
		resp, err := client.Embed(context.Background(), texts("kept"))
		stayed <- answer{resp, err}
	}()
	waitQueued(t, client, 2)
	close(gate)
	a := <-stayed
	if a.err != nil {
		t.Fatal(a.err)
	}
	checkOwn(t, []string{"kept"}, a.resp)
	if calls := script.seen(); len(calls) != 1 || strings.Join(calls[0].inputs, ",") != "kept" {
		t.Fatalf("the server saw %d calls (first %v), want one of [kept]", len(calls), calls[0].inputs)
	}
}

func waitQueued(t *testing.T, c *CoalescingEmbedClient, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for queuedCallers(c) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d callers waiting after 10 s, want %d", queuedCallers(c), n)
		}
		time.Sleep(time.Millisecond)
	}
}

func queuedCallers(c *CoalescingEmbedClient) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.queued
}
