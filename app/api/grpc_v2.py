"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``, as Triton and KServe serve it),
on ``SEGMENT_GRPC_ADDRESS`` beside the HTTP port, in the same process and event loop: the same model control,
inference, admission and admin token as the REST routes. The service's generated code is tritonclient's (the
``grpc`` extra); imported only when the address is set.
"""

import functools
import struct

import grpc
from fastapi import HTTPException
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from ..core.errors import ServiceError
from ..serving.budget import PixelBudget
from ..serving.state import ServiceState
from . import inference
from .deps import require_admin
from .model_control import ModelControl
from .oip import DATATYPE_OF, InferRequest, ProtocolError, chosen_outputs, little_endian

# HTTP statuses of the service's errors, as gRPC status codes
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
         409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
         415: grpc.StatusCode.INVALID_ARGUMENT, 422: grpc.StatusCode.INVALID_ARGUMENT,
         503: grpc.StatusCode.UNAVAILABLE}
# Where the typed (not raw) contents of each datatype live
CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
            "UINT64": "uint64_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}


def answers_errors(method):
    """The service's errors as gRPC statuses with the same words."""

    @functools.wraps(method)
    async def call(self, request, context):
        try:
            return await method(self, request, context)
        except ServiceError as exc:
            await context.abort(CODES.get(exc.status_code, grpc.StatusCode.UNKNOWN), exc.detail)
        except HTTPException as exc:
            await context.abort(CODES.get(exc.status_code, grpc.StatusCode.UNKNOWN), str(exc.detail))

    return call


def to_request(request) -> tuple[InferRequest, dict[str, bytes]]:
    """A ``ModelInferRequest`` as the REST request it says the same as: typed contents, or raw contents (BYTES
    elements length-prefixed, as in the binary extension)."""
    inputs, raw = [], {}
    for i, tensor in enumerate(request.inputs):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if request.raw_input_contents:
            if i >= len(request.raw_input_contents):
                raise ProtocolError("raw_input_contents has fewer entries than there are inputs")
            raw[tensor.name] = request.raw_input_contents[i]
        elif tensor.datatype == "BYTES":
            raw[tensor.name] = b"".join(struct.pack("<I", len(b)) + b for b in tensor.contents.bytes_contents)
        elif tensor.datatype in CONTENTS:
            entry["data"] = list(getattr(tensor.contents, CONTENTS[tensor.datatype]))
        inputs.append(entry)
    outputs = [{"name": o.name} for o in request.outputs] or None
    try:
        return InferRequest.model_validate({"id": request.id or None, "inputs": inputs, "outputs": outputs}), raw
    except ValueError as exc:
        raise ProtocolError(f"invalid inference request: {str(exc).splitlines()[0]}") from None


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's calls; the others (statistics, shared memory, traces settings) answer UNIMPLEMENTED."""

    def __init__(self, state: ServiceState, version: str, pixels: PixelBudget):
        self.state, self.control, self.version, self.pixels = state, ModelControl(state), version, pixels

    def _admin(self, context) -> None:
        require_admin(self.state, dict(context.invocation_metadata()).get("authorization"))

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.state.model is not None)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.control.loaded(request.name))

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="bisenet-serve", version=self.version,
                                         extensions=["binary_tensor_data", "model_repository"])

    @answers_errors
    async def ModelMetadata(self, request, context):
        inference.check_version(request.version)
        meta = inference.model_metadata(self.control, request.name)
        tensors = {key: [pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta[key]]
                   for key in ("inputs", "outputs")}
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        **tensors)

    @answers_errors
    async def ModelInfer(self, request, context):
        inference.check_version(request.model_version)
        with self.state.admit() as admitted:
            if not admitted:
                raise ServiceError("the server is busy; retry shortly", 503)
            req, raw = to_request(request)
            outputs = await inference.infer(self.state, self.control, request.model_name, req, raw, self.pixels)
        names = chosen_outputs(outputs, req)
        return pb.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name=n, datatype=DATATYPE_OF[outputs[n].dtype],
                                                             shape=outputs[n].shape) for n in names],
            raw_output_contents=[little_endian(outputs[n]).tobytes() for n in names])

    @answers_errors
    async def RepositoryIndex(self, request, context):
        self._admin(context)
        models = [m for m in self.control.index() if not request.ready or m["state"] == "READY"]
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**m) for m in models])

    @answers_errors
    async def RepositoryModelLoad(self, request, context):
        self._admin(context)
        await self.control.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @answers_errors
    async def RepositoryModelUnload(self, request, context):
        self._admin(context)
        await self.control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


async def start(state: ServiceState, address: str, version: str, pixels: PixelBudget) -> grpc.aio.Server:
    """Serve the protocol on ``address`` (host:port) in this event loop; stop it with ``await server.stop(grace)``."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", state.settings.max_upload_bytes + 65536)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(state, version, pixels), server)
    if server.add_insecure_port(address) == 0:
        raise ServiceError(f"SEGMENT_GRPC_ADDRESS={address!r}: cannot listen there")
    await server.start()
    return server
