"""The Open Inference Protocol v2 (KServe v2, Triton HTTP) on the wire: requests and responses in the JSON tensor
encoding or with the binary tensor data extension, and errors in the protocol's ``{"error": "..."}`` shape."""

import base64
import binascii
import json
import struct
from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError

from ..core.errors import ServiceError

HEADER_LENGTH = "Inference-Header-Content-Length"
DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "FP16": np.float16,
          "FP32": np.float32, "FP64": np.float64}
DATATYPE_OF = {np.dtype(v): k for k, v in DTYPES.items()}


class ProtocolError(ServiceError):
    """A request that does not follow the protocol or this service's tensors (400)."""


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class V2Route(APIRoute):
    """A route whose errors, from the route or its dependencies, come back as ``{"error": "..."}`` (the rest of the
    API keeps FastAPI's ``{"detail": ...}``)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                return error(exc.status_code, exc.detail)
            except HTTPException as exc:
                return error(exc.status_code, str(exc.detail), exc.headers)
            except (RequestValidationError, ValidationError) as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors())
                return error(400, f"invalid request: {problems}")

        return handle


class TensorIn(BaseModel):
    name: str
    shape: list[int] = Field(description="Dimensions; -1 is not allowed in a request")
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class TensorOut(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[TensorIn] = Field(min_length=1)
    outputs: list[TensorOut] | None = None


async def read_request(request: Request) -> tuple[InferRequest, dict[str, bytes]]:
    """The request header and, per input sent as binary data, its raw bytes (the body's size limit is the
    middleware's)."""
    body = await request.body()
    length = request.headers.get(HEADER_LENGTH)
    if length is not None:
        if not length.isdigit() or int(length) > len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {length!r} for a body of {len(body)} bytes")
        header, rest = body[: int(length)], body[int(length):]
    else:
        header, rest = body, b""
    try:
        req = InferRequest.model_validate(json.loads(header or b"null"))
    except ValueError as exc:  # JSONDecodeError and pydantic's ValidationError are both ValueErrors
        raise ProtocolError(f"the inference request is not valid JSON of the protocol: {str(exc).splitlines()[0]}")
    raw, offset = {}, 0
    for tensor in req.inputs:
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(rest):
            raise ProtocolError(f"input {tensor.name!r}: binary_data_size {size!r} runs past the body's "
                                f"{len(rest)} bytes of binary data")
        raw[tensor.name], offset = rest[offset: offset + size], offset + size
    if offset != len(rest):
        raise ProtocolError(f"{len(rest) - offset} bytes of binary data belong to no input")
    return req, raw


def _flatten(data) -> list:
    if isinstance(data, list):
        return [x for item in data for x in _flatten(item)]
    return [data]


def _count(shape: list[int], name: str) -> int:
    if any(d < 0 for d in shape):
        raise ProtocolError(f"input {name!r}: shape {shape} has a negative dimension")
    return int(np.prod(shape, dtype=np.int64))


def bytes_elements(tensor: TensorIn, raw: bytes | None) -> list[bytes]:
    """The elements of a BYTES tensor: length-prefixed in binary data, base64 strings in JSON."""
    n = _count(tensor.shape, tensor.name)
    if raw is not None:
        items, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise ProtocolError(f"input {tensor.name!r}: BYTES data cut short in an element's length")
            (size,) = struct.unpack_from("<I", raw, offset)
            items.append(raw[offset + 4: offset + 4 + size])
            offset += 4 + size
        if offset != len(raw):
            raise ProtocolError(f"input {tensor.name!r}: BYTES data cut short in element {len(items) - 1}")
    else:
        try:
            items = [base64.b64decode(x, validate=True) for x in _flatten(tensor.data)]
        except (binascii.Error, TypeError, ValueError):
            raise ProtocolError(f"input {tensor.name!r}: in the JSON encoding each BYTES element is an image as a "
                                "base64 string (or send it as binary data)") from None
    if len(items) != n:
        raise ProtocolError(f"input {tensor.name!r}: shape {tensor.shape} holds {n} elements but {len(items)} came")
    return items


def numeric(tensor: TensorIn, raw: bytes | None) -> np.ndarray:
    """A numeric tensor as an array of its datatype and shape, from binary data or the JSON's flat or nested
    list (values outside the datatype's range refused)."""
    dtype = np.dtype(DTYPES[tensor.datatype]).newbyteorder("<")
    n = _count(tensor.shape, tensor.name)
    if raw is not None:
        if len(raw) != n * dtype.itemsize:
            raise ProtocolError(f"input {tensor.name!r}: {len(raw)} bytes of binary data for shape {tensor.shape} "
                                f"of {tensor.datatype} ({n * dtype.itemsize} expected)")
        return np.frombuffer(raw, dtype).reshape(tensor.shape)
    values = _flatten(tensor.data)
    if len(values) != n:
        raise ProtocolError(f"input {tensor.name!r}: shape {tensor.shape} holds {n} elements but {len(values)} came")
    try:
        array = np.asarray(values, np.float64 if dtype.kind == "f" else np.int64)
    except (TypeError, ValueError):
        raise ProtocolError(f"input {tensor.name!r}: data must be numbers of {tensor.datatype}") from None
    if dtype.kind in "iu" and array.size and (array.min() < np.iinfo(dtype).min or array.max() > np.iinfo(dtype).max):
        raise ProtocolError(f"input {tensor.name!r}: values outside the range of {tensor.datatype}")
    return array.astype(dtype).reshape(tensor.shape)


def chosen_outputs(outputs: dict[str, np.ndarray], req: InferRequest) -> list[str]:
    """The names of the outputs the request asks for (all when it names none); 400 for one the model lacks."""
    if req.outputs is None:
        return list(outputs)
    for out in req.outputs:
        if out.name not in outputs:
            raise ProtocolError(f"unknown output {out.name!r}; this model has {', '.join(map(repr, outputs))}")
    return [out.name for out in req.outputs]


def little_endian(array: np.ndarray) -> np.ndarray:
    """The array contiguous in little-endian order, as the protocol's binary data is."""
    return np.ascontiguousarray(array, array.dtype.newbyteorder("<"))


def encode_response(model_name: str, req: InferRequest, outputs: dict[str, np.ndarray]) -> Response:
    """The response: the outputs asked for (all when none are named), each as binary data when asked for
    (per output ``binary_data``, or the request's ``binary_data_output``), else in the JSON."""
    chosen_outputs(outputs, req)
    wanted = req.outputs if req.outputs is not None else [TensorOut(name=n) for n in outputs]
    default_binary = bool(req.parameters.get("binary_data_output", False))
    entries, chunks = [], []
    for out in wanted:
        array = outputs[out.name]
        entry = {"name": out.name, "datatype": DATATYPE_OF[array.dtype], "shape": list(array.shape)}
        if out.parameters.get("binary_data", default_binary):
            data = little_endian(array).tobytes()
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    header = {"model_name": model_name, "model_version": "1", "outputs": entries}
    if req.id is not None:
        header["id"] = req.id
    body = json.dumps(header, separators=(",", ":")).encode()
    if not chunks:
        return Response(body, media_type="application/json")
    return Response(body + b"".join(chunks), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(body))})
