"""Generated protobuf and gRPC stubs for the embedserve.v1 API (see protos/embedserve/v1/*.proto).

Regenerate with ``make protos``; ``make check-protos`` fails when these drift from the protos.
"""
