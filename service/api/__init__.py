"""The gRPC transport: validate requests, call the inference layer, encode responses."""
