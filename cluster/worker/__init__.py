"""What both worker roles share: config, the engine thread, the gRPC server, registration and the Ray actor."""
