"""What every worker role shares: config, the engine thread, the gRPC server, registration and the Ray actor."""
