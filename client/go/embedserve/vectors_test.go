package embedserve

import (
	"encoding/binary"
	"math"
	"strings"
	"testing"

	embedservev1 "github.com/embedserve/embedserve/client/go/embedserve/v1"
)

func littleEndian(values ...float32) []byte {
	data := make([]byte, 4*len(values))
	for i, v := range values {
		binary.LittleEndian.PutUint32(data[4*i:], math.Float32bits(v))
	}
	return data
}

func TestVectorDecodesEachFloatEncoding(t *testing.T) {
	want := []float32{0.5, -1.25, 3}
	cases := map[string]*embedservev1.Embedding{
		"float32": {Dimensions: 3, Vector: &embedservev1.Embedding_Float32{
			Float32: &embedservev1.FloatVector{Values: want}}},
		"float32_bytes": {Dimensions: 3, Vector: &embedservev1.Embedding_Float32Bytes{
			Float32Bytes: littleEndian(want...)}},
		// -1.25 = -5 * 0.25: the int8 form is exact here.
		"int8": {Dimensions: 3, Vector: &embedservev1.Embedding_Int8{
			Int8: &embedservev1.Int8Vector{Values: []byte{2, 0xfb, 12}, Scale: 0.25}}},
	}
	for name, embedding := range cases {
		got, err := Vector(embedding)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if len(got) != len(want) {
			t.Fatalf("%s: %d values, want %d", name, len(got), len(want))
		}
		for i := range want {
			if got[i] != want[i] {
				t.Errorf("%s: value %d = %v, want %v", name, i, got[i], want[i])
			}
		}
	}
}

func TestVectorRejectsMismatchAndBinary(t *testing.T) {
	cases := map[string]struct {
		embedding *embedservev1.Embedding
		message   string
	}{
		"short bytes": {&embedservev1.Embedding{Dimensions: 3, Vector: &embedservev1.Embedding_Float32Bytes{
			Float32Bytes: littleEndian(1, 2)}}, "float32_bytes: 8 bytes for 3 dimensions"},
		"short floats": {&embedservev1.Embedding{Dimensions: 2, Vector: &embedservev1.Embedding_Float32{
			Float32: &embedservev1.FloatVector{Values: []float32{1}}}}, "float32: 1 values for 2 dimensions"},
		"binary": {&embedservev1.Embedding{Dimensions: 8, Vector: &embedservev1.Embedding_Binary{
			Binary: []byte{0x80}}}, "binary:"},
		"unset": {&embedservev1.Embedding{Dimensions: 8}, "no vector set"},
	}
	for name, c := range cases {
		if _, err := Vector(c.embedding); err == nil || !strings.Contains(err.Error(), c.message) {
			t.Errorf("%s: error %v, want one containing %q", name, err, c.message)
		}
	}
}

func TestVectorsNamesTheFailingEmbedding(t *testing.T) {
	good := &embedservev1.Embedding{Dimensions: 1, Vector: &embedservev1.Embedding_Float32Bytes{
		Float32Bytes: littleEndian(7)}}
	bad := &embedservev1.Embedding{Dimensions: 2, Vector: &embedservev1.Embedding_Float32Bytes{
		Float32Bytes: littleEndian(7)}}
	vectors, err := Vectors(&embedservev1.EmbedResponse{Embeddings: []*embedservev1.Embedding{good, good}})
	if err != nil || len(vectors) != 2 || vectors[1][0] != 7 {
		t.Fatalf("Vectors = %v, %v; want two vectors [7]", vectors, err)
	}
	_, err = Vectors(&embedservev1.EmbedResponse{Embeddings: []*embedservev1.Embedding{good, bad}})
	if err == nil || !strings.HasPrefix(err.Error(), "embeddings[1]: ") {
		t.Fatalf("error %v, want it to name embeddings[1]", err)
	}
}
