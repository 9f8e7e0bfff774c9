"""Finds tensors that an ONNX model keeps in external data files, reading the protobuf wire format
directly: serving installs no `onnx` package, and ONNX Runtime has no switch to refuse external data.

ONNX Runtime opens an external-data tensor's `location` relative to the model's folder (or the
working directory for a model given as bytes), so a graph that uses it loads bytes the bundle's
checksum never covered. The bundle refuses such graphs (lstmgen/bundle.py).

The bytes are untrusted (a file whose checksum was updated to match proves nothing), so the walk is
bounded: tensor data and every field outside the graph's structure are skipped by their length,
bytes that are not protobuf (field number 0: a zero-filled file; a bad wire type) are refused at the
first field, and at most `MAX_FIELDS` fields are read, hundreds of times what an lstmgen graph has.
"""
from __future__ import annotations

# The message fields that can hold tensors, by field number (onnx/onnx.proto). Everything else is
# skipped unparsed.
_TENSOR, _SPARSE, _GRAPH, _NODE, _ATTR, _FUNCTION, _TRAINING, _MODEL = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _FUNCTION: {7: _NODE, 11: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_MAX_DEPTH = 64  # graphs nest through If/Loop/Scan bodies; far deeper is not a real model
_MAX_NUMBER = (1 << 29) - 1  # protobuf's largest field number
# lstmgen's graphs have 200-400 fields outside tensor data (int8 included), however wide the model;
# this many are read in about 0.1 s, whatever the file's size
MAX_FIELDS = 100_000


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message (or not one worth walking)."""


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise WireError(f"truncated or overlong varint at byte {i}")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


class _Walk:
    """The fields of one serialized message at a time, counted against one budget for the file."""

    def __init__(self, buf: bytes):
        self.buf, self.left = buf, MAX_FIELDS

    def fields(self, start: int, end: int):
        """(field number, wire type, value) of one message: value is an int, or (start, end) of bytes."""
        buf, i = self.buf, start
        while i < end:
            self.left -= 1
            if self.left < 0:
                raise WireError(f"more than {MAX_FIELDS:,} protobuf fields outside tensor data "
                                "(an lstmgen graph has a few hundred)")
            at = i
            key = buf[i]
            if key < 0x80:  # one-byte key: fields 1-15, nearly every field of a real graph
                i += 1
            else:
                key, i = _varint(buf, i)
            number, wire = key >> 3, key & 7
            if not 0 < number <= _MAX_NUMBER:  # a zero byte reads as field 0, which protobuf reserves
                raise WireError(f"field number {number} at byte {at} is not valid protobuf"
                                + (" (zero bytes where a field should start)" if buf[at] == 0 else ""))
            if wire == 0:
                value, i = _varint(buf, i)
            elif wire == 2:
                n, i = _varint(buf, i)
                value, i = (i, i + n), i + n
            elif wire == 1 or wire == 5:
                value, i = None, i + (8 if wire == 1 else 4)
            else:  # groups (3, 4) are not used by onnx.proto; 6 and 7 do not exist
                raise WireError(f"wire type {wire} at byte {at} is not used by ONNX")
            if i > end:
                raise WireError(f"field {number} at byte {at} runs past the end of its message (byte {end})")
            yield number, wire, value


def external_tensors(model: bytes) -> list[str]:
    """Names of the tensors of a serialized ModelProto whose data lives outside it. Raises
    WireError for bytes that are not one, or too many fields to be an lstmgen graph."""
    walk = _Walk(model)
    found: list[str] = []
    stack = [(_MODEL, 0, len(model), 0)]
    while stack:
        kind, start, end, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise WireError(f"messages nested deeper than {_MAX_DEPTH}")
        if kind == _TENSOR:
            name, external = "?", False
            for number, wire, value in walk.fields(start, end):
                if number == _TENSOR_NAME and wire == 2:
                    name = model[value[0]:value[1]].decode("utf-8", "replace")
                elif (number == _TENSOR_DATA_LOCATION and wire == 0 and value) or number == _TENSOR_EXTERNAL_DATA:
                    external = True
            if external:
                found.append(name)
            continue
        children = _CHILDREN[kind]
        for number, wire, value in walk.fields(start, end):
            child = children.get(number)
            if child is not None and wire == 2:
                stack.append((child, value[0], value[1], depth + 1))
    return found
