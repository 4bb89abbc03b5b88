"""What admins use to drive Tidegate: a typed Python client over the gRPC stubs."""
