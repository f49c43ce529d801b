"""The jachat.v1 gRPC edge: the servicer, protobuf conversion, health, TLS and bearer-token interception."""
