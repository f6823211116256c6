// Package embedserve is the Go client library of embedserve, beside the generated stubs in
// package embedservev1.
//
// Its main piece is CoalescingEmbedClient: an embedservev1.EmbedServiceClient that merges
// concurrent Embed calls into one. A Go service that embeds one query a request, many
// requests at a time, makes the server pay gRPC's per-call cost once a text; on a server
// with few cores that cost is most of what stands between single-text callers and the
// model's own throughput (docs/benchmarks.md, "Merged calls"). It is the analogue of the
// Python client's coalesce=True and a drop-in for the generated client:
//
//	conn, _ := grpc.Dial(target, grpc.WithInsecure())
//	embed := embedserve.NewCoalescingEmbedClient(embedservev1.NewEmbedServiceClient(conn), 64)
//	resp, err := embed.Embed(ctx, &embedservev1.EmbedRequest{Inputs: []string{query}})
package embedserve

import (
	"context"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	embedservev1 "github.com/embedserve/embedserve/client/go/embedserve/v1"
)

// DefaultMaxInputs is the most texts a merged call holds unless one caller alone sends more:
// the batch size at which the server's forward pass stops gaining on a CPU.
const DefaultMaxInputs = 64

// maxJoinYields bounds how often a flush yields the processor so that callers made runnable
// together (by the answers of one merged call) can join it before it is sent.
const maxJoinYields = 4

// CoalescingEmbedClient merges Embed calls that are waiting at the same moment and whose
// requests are equal but for their inputs, with equal outgoing metadata, into one call of at
// most MaxInputs texts. It adds no waiting of its own: a call is sent as soon as the callers
// runnable at that moment have joined it, so a lone caller is sent at once.
//
// What a caller sees does not change, except that calls merged together share one fate on
// the server:
//   - An INVALID_ARGUMENT answer whose BadRequest names an input ("inputs[i]") is one
//     caller's error, not the others': each caller of the merged call is sent again alone,
//     with its own context, so that each gets its own answer and a violation names its own
//     index. One that names only the options they share is all of theirs.
//   - Any other error (overload, unavailable, a deadline) is every merged caller's error.
//   - A caller whose context ends gets its context's status (DEADLINE_EXCEEDED or
//     CANCELLED) at once and leaves the merged call to the others; the merged call is
//     cancelled when all of its callers have left. The merged call carries the latest of the
//     callers' deadlines (none if one of them has none).
//   - A caller's texts are never split between merged calls.
//   - A server that takes fewer texts a call (its --max-inputs) answers a merged call with
//     a violation of "inputs" itself. That is nobody's error: the callers are sent alone,
//     and MaxInputs halves until merged calls fit.
//
// Calls with grpc.CallOptions, with no inputs, or with more than MaxInputs inputs are sent
// alone, unchanged. Values of a caller's context other than its deadline and outgoing
// metadata do not reach a merged call. EmbedStream is passed through.
//
// Each caller's response holds its own embeddings, its own Usage (summed from the
// per-input Embedding.input_tokens, truncated and cached), the model, and a copy of the
// merged call's Timing.
type CoalescingEmbedClient struct {
	next      embedservev1.EmbedServiceClient
	maxInputs atomic.Int64 // lowered when the server refuses a merged call's size

	mu       sync.Mutex
	waiting  map[string]*group
	queued   int  // callers in waiting
	flushing bool // a flush goroutine is on its way

	wrapMerged MergedCallFunc // nil: merged calls are sent as they are

	// beforeFlush, when set (by tests), runs at the start of each flush.
	beforeFlush func()
}

// MergedCallFunc wraps each merged call: it gets the merged call's context (its deadline and
// metadata), the contexts of the callers merged into it, and send, which makes the call
// with the context it is given (one derived from ctx) and returns its error. It must call
// send once and return its error. It is where a merged call's trace span belongs, linked
// to the callers' spans, since no caller's span context reaches the merged call:
//
//	func(ctx context.Context, callers []context.Context, send func(context.Context) error) error {
//		links := make([]trace.Link, 0, len(callers))
//		for _, caller := range callers {
//			links = append(links, trace.LinkFromContext(caller))
//		}
//		ctx, span := tracer.Start(ctx, "embedserve.merged", trace.WithLinks(links...))
//		defer span.End()
//		return send(ctx)
//	}
type MergedCallFunc func(ctx context.Context, callers []context.Context, send func(context.Context) error) error

// Option configures a CoalescingEmbedClient.
type Option func(*CoalescingEmbedClient)

// WithMergedCall wraps every call the client merges (not the calls it sends unchanged, nor a
// caller resent alone, which carry the caller's own context).
func WithMergedCall(wrap MergedCallFunc) Option {
	return func(c *CoalescingEmbedClient) { c.wrapMerged = wrap }
}

var _ embedservev1.EmbedServiceClient = (*CoalescingEmbedClient)(nil)

// NewCoalescingEmbedClient wraps next (usually embedservev1.NewEmbedServiceClient(conn)).
// maxInputs of 0 or less means DefaultMaxInputs.
func NewCoalescingEmbedClient(next embedservev1.EmbedServiceClient, maxInputs int, options ...Option) *CoalescingEmbedClient {
	if maxInputs <= 0 {
		maxInputs = DefaultMaxInputs
	}
	c := &CoalescingEmbedClient{next: next, waiting: map[string]*group{}}
	c.maxInputs.Store(int64(maxInputs))
	for _, option := range options {
		option(c)
	}
	return c
}

// MaxInputs is the most texts one merged call holds: the one given, or less once the
// server has refused that many in one call.
func (c *CoalescingEmbedClient) MaxInputs() int { return int(c.maxInputs.Load()) }

type result struct {
	resp *embedservev1.EmbedResponse
	err  error
}

type caller struct {
	ctx    context.Context
	req    *embedservev1.EmbedRequest
	answer chan result // buffered: whoever answers never waits for the caller

	// Guarded by the client's mu.
	left   bool
	merged *mergedCall
}

// group is the callers waiting for the next flush with one merge key.
type group struct {
	options *embedservev1.EmbedRequest // the first caller's request without its inputs
	md      metadata.MD
	callers []*caller
}

type mergedCall struct {
	options *embedservev1.EmbedRequest
	callers []*caller
	active  int // callers that have not left; guarded by the client's mu
	ctx     context.Context
	cancel  context.CancelFunc
}

// Embed sends req, merged with the calls waiting beside it when it can be.
func (c *CoalescingEmbedClient) Embed(ctx context.Context, req *embedservev1.EmbedRequest, opts ...grpc.CallOption) (*embedservev1.EmbedResponse, error) {
	if len(opts) > 0 || len(req.GetInputs()) == 0 || len(req.GetInputs()) > c.MaxInputs() {
		return c.next.Embed(ctx, req, opts...)
	}
	if err := ctx.Err(); err != nil {
		return nil, status.FromContextError(err).Err()
	}
	options := proto.Clone(req).(*embedservev1.EmbedRequest)
	options.Inputs = nil
	md, _ := metadata.FromOutgoingContext(ctx)
	key, err := mergeKey(options, md)
	if err != nil { // a request that cannot be marshalled fails in the stub as it would alone
		return c.next.Embed(ctx, req)
	}
	cl := &caller{ctx: ctx, req: req, answer: make(chan result, 1)}

	c.mu.Lock()
	g := c.waiting[key]
	if g == nil {
		g = &group{options: options, md: md}
		c.waiting[key] = g
	}
	g.callers = append(g.callers, cl)
	c.queued++
	start := !c.flushing
	c.flushing = true
	c.mu.Unlock()
	if start {
		go c.flush()
	}

	select {
	case r := <-cl.answer:
		return r.resp, r.err
	case <-ctx.Done():
		c.leave(cl)
		return nil, status.FromContextError(ctx.Err()).Err()
	}
}

// EmbedStream is the wrapped client's: a stream already carries many inputs a message.
func (c *CoalescingEmbedClient) EmbedStream(ctx context.Context, opts ...grpc.CallOption) (embedservev1.EmbedService_EmbedStreamClient, error) {
	return c.next.EmbedStream(ctx, opts...)
}

// mergeKey says everything a merged call takes from its callers but their inputs.
func mergeKey(options *embedservev1.EmbedRequest, md metadata.MD) (string, error) {
	wire, err := proto.MarshalOptions{Deterministic: true}.Marshal(options)
	if err != nil {
		return "", err
	}
	// Each part is prefixed by its length, so that no two keys run together.
	var key strings.Builder
	writePart := func(part string) {
		key.WriteString(strconv.Itoa(len(part)))
		key.WriteByte(':')
		key.WriteString(part)
	}
	writePart(string(wire))
	names := make([]string, 0, len(md))
	for name := range md {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		writePart(name)
		key.WriteString(strconv.Itoa(len(md[name])))
		for _, value := range md[name] {
			writePart(value)
		}
	}
	return key.String(), nil
}

func (c *CoalescingEmbedClient) leave(cl *caller) {
	c.mu.Lock()
	cl.left = true
	m := cl.merged
	cancel := false
	if m != nil {
		m.active--
		cancel = m.active == 0
	}
	c.mu.Unlock()
	if cancel {
		m.cancel()
	}
}

func (c *CoalescingEmbedClient) flush() {
	if c.beforeFlush != nil {
		c.beforeFlush()
	}
	// Callers woken together by one merged answer send their next calls within
	// microseconds of each other: let those already runnable join before sending.
	seen := -1
	for i := 0; i < maxJoinYields; i++ {
		c.mu.Lock()
		queued := c.queued
		c.mu.Unlock()
		if queued == seen {
			break
		}
		seen = queued
		runtime.Gosched()
	}

	c.mu.Lock()
	groups := c.waiting
	c.waiting = map[string]*group{}
	c.queued = 0
	c.flushing = false
	var calls []*mergedCall
	for _, g := range groups {
		for _, callers := range c.chunks(g.callers) {
			m := &mergedCall{options: g.options, callers: callers, active: len(callers)}
			m.ctx, m.cancel = mergedContext(g.md, callers)
			for _, cl := range callers {
				cl.merged = m
			}
			calls = append(calls, m)
		}
	}
	c.mu.Unlock()

	for i, m := range calls {
		if i == len(calls)-1 {
			c.send(m) // the last one on this goroutine
		} else {
			go c.send(m)
		}
	}
}

// chunks splits callers that have not left into calls of at most maxInputs texts; called
// with mu held.
func (c *CoalescingEmbedClient) chunks(callers []*caller) [][]*caller {
	var chunks [][]*caller
	inputs, maxInputs := 0, c.MaxInputs()
	for _, cl := range callers {
		if cl.left {
			continue
		}
		n := len(cl.req.Inputs)
		if len(chunks) == 0 || inputs+n > maxInputs {
			chunks = append(chunks, nil)
			inputs = 0
		}
		chunks[len(chunks)-1] = append(chunks[len(chunks)-1], cl)
		inputs += n
	}
	return chunks
}

func (c *CoalescingEmbedClient) send(m *mergedCall) {
	defer m.cancel()
	req := proto.Clone(m.options).(*embedservev1.EmbedRequest)
	for _, cl := range m.callers {
		req.Inputs = append(req.Inputs, cl.req.Inputs...)
	}
	resp, err := c.call(m, req)
	if err != nil {
		if len(m.callers) > 1 {
			oneInput, tooMany := namesInputs(err)
			if tooMany {
				// More texts than the server takes a call: the merging's fault, not any
				// caller's. Merge less from now on; the server's limit is not known here.
				c.lowerMaxInputs(len(req.Inputs) / 2)
			}
			if oneInput || tooMany {
				c.resendAlone(m.callers)
				return
			}
		}
		answerAll(m.callers, err)
		return
	}
	if got := len(resp.GetEmbeddings()); got != len(req.Inputs) {
		answerAll(m.callers, status.Errorf(codes.Internal,
			"the server returned %d embeddings for %d inputs", got, len(req.Inputs)))
		return
	}
	start := 0
	for _, cl := range m.callers {
		end := start + len(cl.req.Inputs)
		cl.answer <- result{resp: callerResponse(resp, resp.Embeddings[start:end:end])}
		start = end
	}
}

// answerAll gives every caller of a merged call its error.
func answerAll(callers []*caller, err error) {
	for _, cl := range callers {
		cl.answer <- result{err: err}
	}
}

// call sends a merged request, through the MergedCallFunc when there is one.
func (c *CoalescingEmbedClient) call(m *mergedCall, req *embedservev1.EmbedRequest) (*embedservev1.EmbedResponse, error) {
	if c.wrapMerged == nil {
		return c.next.Embed(m.ctx, req)
	}
	callers := make([]context.Context, len(m.callers))
	for i, cl := range m.callers {
		callers[i] = cl.ctx
	}
	var resp *embedservev1.EmbedResponse
	err := c.wrapMerged(m.ctx, callers, func(ctx context.Context) error {
		var err error
		resp, err = c.next.Embed(ctx, req)
		return err
	})
	if err == nil && resp == nil {
		return nil, status.Error(codes.Internal, "the MergedCallFunc returned without sending the merged call")
	}
	return resp, err
}

// resendAlone sends each caller's own request with its own context, so that an input's
// error reaches only its caller and names its own index.
func (c *CoalescingEmbedClient) resendAlone(callers []*caller) {
	var wg sync.WaitGroup
	for _, cl := range callers {
		c.mu.Lock()
		left := cl.left
		c.mu.Unlock()
		if left {
			continue
		}
		wg.Add(1)
		go func(cl *caller) {
			defer wg.Done()
			resp, err := c.next.Embed(cl.ctx, cl.req)
			cl.answer <- result{resp: resp, err: err}
		}(cl)
	}
	wg.Wait()
}

// mergedContext carries the callers' shared metadata and the latest of their deadlines,
// and none of their values: the merged call outlives any one of them.
func mergedContext(md metadata.MD, callers []*caller) (context.Context, context.CancelFunc) {
	ctx := context.Background()
	if md != nil {
		ctx = metadata.NewOutgoingContext(ctx, md)
	}
	if deadline, ok := latestDeadline(callers); ok {
		return context.WithDeadline(ctx, deadline)
	}
	return context.WithCancel(ctx)
}

func latestDeadline(callers []*caller) (time.Time, bool) {
	var latest time.Time
	for _, cl := range callers {
		deadline, ok := cl.ctx.Deadline()
		if !ok {
			return time.Time{}, false
		}
		if deadline.After(latest) {
			latest = deadline
		}
	}
	return latest, true
}

// lowerMaxInputs sets MaxInputs to n (at least 1) unless it is already lower.
func (c *CoalescingEmbedClient) lowerMaxInputs(n int) {
	if n < 1 {
		n = 1
	}
	for {
		current := c.maxInputs.Load()
		if current <= int64(n) || c.maxInputs.CompareAndSwap(current, int64(n)) {
			return
		}
	}
}

// namesInputs reads an INVALID_ARGUMENT's BadRequest: whether it names one input
// ("inputs[i]") and whether it names the inputs as a whole ("inputs": too many of them).
func namesInputs(err error) (oneInput, tooMany bool) {
	s, ok := status.FromError(err)
	if !ok || s.Code() != codes.InvalidArgument {
		return false, false
	}
	for _, detail := range s.Details() {
		if bad, ok := detail.(*errdetails.BadRequest); ok {
			for _, violation := range bad.GetFieldViolations() {
				field := violation.GetField()
				oneInput = oneInput || strings.HasPrefix(field, "inputs[")
				tooMany = tooMany || field == "inputs"
			}
		}
	}
	return oneInput, tooMany
}

// callerResponse is one caller's part of a merged response.
func callerResponse(merged *embedservev1.EmbedResponse, embeddings []*embedservev1.Embedding) *embedservev1.EmbedResponse {
	usage := &embedservev1.Usage{Inputs: uint32(len(embeddings))}
	for _, e := range embeddings {
		usage.InputTokens += e.GetInputTokens()
		if e.GetTruncated() {
			usage.TruncatedInputs++
		}
		if e.GetCached() {
			usage.CachedInputs++
		}
	}
	resp := &embedservev1.EmbedResponse{Model: merged.GetModel(), Embeddings: embeddings, Usage: usage}
	if merged.Timing != nil {
		resp.Timing = proto.Clone(merged.Timing).(*embedservev1.Timing)
	}
	return resp
}
