"""jachat: rinna's Japanese chat model served over gRPC through CTranslate2.

One package, in one folder of the repository:
- `jachat.service`: the service (jachat-serve, jachat-chat), in layers: edge, engine and observability, domain, text;
- `jachat.converter`: the checkpoint converter (jachat-convert);
- `jachat.bench`: the benchmark and its server launcher (jachat-bench);
- `jachat.manifest`: the model folder's contract, shared by the converter and the engine;
- `jachat.v1`: the generated protobuf and gRPC stubs of the API (build outputs, never committed).
"""
