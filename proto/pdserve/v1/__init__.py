"""Generated gRPC/protobuf code for the pdserve.v1 API (regenerate with proto/gen.sh)."""
