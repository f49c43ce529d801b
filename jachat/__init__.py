"""jachat: rinna's Japanese chat model served over gRPC through CTranslate2.

One import namespace for everything the project installs:
- `jachat.service`: the gRPC service (jachat-serve, jachat-chat);
- `jachat.converter`: the checkpoint converter (jachat-convert);
- `jachat.bench`: the benchmark and its server launcher (jachat-bench);
- `jachat.v1`: the generated protobuf and gRPC stubs of the API (build outputs, never committed).

In the repository the code keeps its top-level folders (service/, converter/, bench/); jachat/service and its
siblings are symbolic links to them, so Python, an editable install, mypy and the wheel build all see one package.
"""
