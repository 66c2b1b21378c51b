"""protoc-gen-grpc_python for buf: grpc_tools' gRPC Python generator as a protoc plugin.

grpcio-tools builds that generator into its own protoc and ships no plugin binary, so this
runs that protoc on the request's descriptors and hands back what it wrote.
"""

import pathlib
import sys
import tempfile

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc

request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
response = plugin_pb2.CodeGeneratorResponse(
    supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
)
with tempfile.TemporaryDirectory() as tmp:
    descriptors, out = pathlib.Path(tmp, "in.binpb"), pathlib.Path(tmp, "out")
    out.mkdir()
    descriptors.write_bytes(
        descriptor_pb2.FileDescriptorSet(file=request.proto_file).SerializeToString()
    )
    args = ["protoc", f"--descriptor_set_in={descriptors}", f"--grpc_python_out={out}"]
    if protoc.main([*args, *request.file_to_generate]) != 0:
        response.error = "grpc_tools.protoc failed (see above)"
    for path in sorted(out.rglob("*.py")):
        response.file.add(name=str(path.relative_to(out)), content=path.read_text())
sys.stdout.buffer.write(response.SerializeToString())
