"""gRPC admin API (package ``tidegate.admin.v1``): servicers and the server."""
