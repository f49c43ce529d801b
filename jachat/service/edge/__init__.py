"""The edges: protocols in, domain objects out. gRPC (`edge.grpc`) and the OpenAI-compatible HTTP API (`edge.http`)
open, classify and end every call through one frame (`edge.calls`); nothing below the edges sees a transport."""
