package embedserve

import (
	"encoding/binary"
	"fmt"
	"math"

	embedservev1 "github.com/embedserve/embedserve/client/go/embedserve/v1"
)

// Vector returns the float32 values of one embedding, whichever float encoding it came in:
// ENCODING_FLOAT32, ENCODING_FLOAT32_BYTES (little-endian, 4 bytes a dimension) or
// ENCODING_INT8, dequantized as value * scale (an approximation, as the encoding is).
// ENCODING_BINARY holds signs only: read Embedding.GetBinary for it.
func Vector(embedding *embedservev1.Embedding) ([]float32, error) {
	dimensions := int(embedding.GetDimensions())
	switch vector := embedding.GetVector().(type) {
	case *embedservev1.Embedding_Float32:
		values := vector.Float32.GetValues()
		if len(values) != dimensions {
			return nil, fmt.Errorf("float32: %d values for %d dimensions", len(values), dimensions)
		}
		return values, nil
	case *embedservev1.Embedding_Float32Bytes:
		data := vector.Float32Bytes
		if len(data) != 4*dimensions {
			return nil, fmt.Errorf("float32_bytes: %d bytes for %d dimensions", len(data), dimensions)
		}
		values := make([]float32, dimensions)
		for i := range values {
			values[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[4*i:]))
		}
		return values, nil
	case *embedservev1.Embedding_Int8:
		data, scale := vector.Int8.GetValues(), vector.Int8.GetScale()
		if len(data) != dimensions {
			return nil, fmt.Errorf("int8: %d bytes for %d dimensions", len(data), dimensions)
		}
		values := make([]float32, dimensions)
		for i, b := range data {
			values[i] = float32(int8(b)) * scale
		}
		return values, nil
	case *embedservev1.Embedding_Binary:
		return nil, fmt.Errorf("binary: the encoding keeps one sign bit a dimension; read GetBinary")
	default:
		return nil, fmt.Errorf("no vector set")
	}
}

// Vectors decodes every embedding of a response with Vector, in input order; the error
// names the first embedding that could not be decoded.
func Vectors(response *embedservev1.EmbedResponse) ([][]float32, error) {
	vectors := make([][]float32, len(response.GetEmbeddings()))
	for i, embedding := range response.GetEmbeddings() {
		vector, err := Vector(embedding)
		if err != nil {
			return nil, fmt.Errorf("embeddings[%d]: %w", i, err)
		}
		vectors[i] = vector
	}
	return vectors, nil
}
