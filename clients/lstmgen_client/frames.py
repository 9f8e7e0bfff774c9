"""Frame streams (FrameModel.StreamFrames): frames in, one output per frame out.

Takes a [T, D_in] array (numpy, or a list of lists) or any iterable of frames (a live source: each
frame goes out as it comes). Needs only grpcio and protobuf: frames travel as sequences of floats;
a numpy input gives numpy outputs, and numpy is never imported otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from lstmgen_client.errors import InvalidArgumentError
from lstmgen_client.v1 import generator_pb2 as pb

STD_FLOOR = 1e-6  # as the trainer's per-sequence standardisation (train/frame_data.py)


@dataclass(frozen=True)
class FrameOutput:
    index: int  # the frame's position in the stream (0-based)
    values: Sequence[float]  # D_out floats: regression values, or classification logits (numpy with numpy input)
    label: int | None = None  # classification: the most likely class
    class_name: str | None = None


class FrameCall:
    """One frame stream's outputs, one per frame, as they come: iterate it (`close()` cancels it).
    With return_state, `state` holds the stream's state once the iteration has ended: continue the
    sequence with stream_frames(more, state=call.state) on any replica of the same model."""

    def __init__(self, responses: Iterator[tuple[pb.FramesResponse, int, Sequence[str]]], as_numpy: bool):
        self.state: bytes | None = None
        self._responses = responses  # (message, output width, class names)
        self._as_numpy = as_numpy
        self._it = self._outputs()

    def _outputs(self) -> Iterator[FrameOutput]:
        for msg, width, names in self._responses:
            if msg.finished and msg.state:
                self.state = msg.state
            yield from outputs(msg, width, names, self._as_numpy)

    def __iter__(self) -> "FrameCall":
        return self

    def __next__(self) -> FrameOutput:
        return next(self._it)

    def close(self) -> None:
        self._it.close()
        self._responses.close()


class AsyncFrameCall:
    """FrameCall for AsyncClient: `async for` it; `state` once it has ended; `await aclose()` cancels."""

    def __init__(self, responses, as_numpy: bool):
        self.state: bytes | None = None
        self._responses = responses  # async iterator of (message, output width, class names)
        self._as_numpy = as_numpy
        self._pending: list[FrameOutput] = []

    def __aiter__(self) -> "AsyncFrameCall":
        return self

    async def __anext__(self) -> FrameOutput:
        while not self._pending:
            msg, width, names = await self._responses.__anext__()  # StopAsyncIteration ends the call
            if msg.finished and msg.state:
                self.state = msg.state
            self._pending = outputs(msg, width, names, self._as_numpy)
        return self._pending.pop(0)

    async def aclose(self) -> None:
        await self._responses.aclose()


def _is_numpy(x) -> bool:
    return type(x).__module__ == "numpy"  # no import: numpy may not be installed


def is_whole(frames) -> bool:
    """An array or a list (every frame known now), not a live iterator."""
    return _is_numpy(frames) or isinstance(frames, (list, tuple))


def standardize_sequence(frames: list[list[float]]) -> list[list[float]]:
    """Per feature over the whole sequence: (x - mean) / max(std, 1e-6), as the model was trained."""
    n = len(frames)
    if n == 0:
        return frames
    d = len(frames[0])
    mean = [sum(f[j] for f in frames) / n for j in range(d)]
    std = [max(math.sqrt(sum((f[j] - mean[j]) ** 2 for f in frames) / n), STD_FLOOR) for j in range(d)]
    return [[(f[j] - mean[j]) / std[j] for j in range(d)] for f in frames]


def as_rows(frames) -> list[list[float]] | Iterable:
    if _is_numpy(frames):
        if frames.ndim != 2:  # a 1-D array is ambiguous: T frames of one value, or one frame of T
            raise InvalidArgumentError(f"INVALID_ARGUMENT: frames: a numpy array must be [T, input_size], got shape "
                                       f"{frames.shape} (reshape(-1, 1) for frames of one value)")
        return frames.astype("float32").tolist()
    return frames


def stream_options(final_only: bool, state: bytes | None, return_state: bool) -> pb.FrameStreamOptions:
    if state is not None and not isinstance(state, (bytes, bytearray)):
        raise InvalidArgumentError(f"INVALID_ARGUMENT: state: must be the bytes a server returned, got "
                                   f"{type(state).__name__}")
    return pb.FrameStreamOptions(final_only=final_only, state=state or b"", return_state=return_state)


class Packer:
    """Frames -> FramesRequests of up to `per_message` frames, the stream's options on the first
    (shared by the blocking and the asyncio client)."""

    def __init__(self, per_message: int, options: pb.FrameStreamOptions):
        self.per_message, self.options = per_message, options
        self.values: list[float] = []
        self.n = 0

    def add(self, frame) -> pb.FramesRequest | None:
        self.values.extend(float(v) for v in frame)
        self.n += 1
        return self.flush() if self.n >= self.per_message else None

    def flush(self) -> pb.FramesRequest:
        msg = pb.FramesRequest(values=self.values, options=self.options)
        self.options, self.values, self.n = None, [], 0
        return msg

    def last(self) -> pb.FramesRequest | None:
        """What is left at the end (the options alone, for a stream of no frames)."""
        return self.flush() if self.n or self.options is not None else None


def requests(frames: Iterable, per_message: int, options: pb.FrameStreamOptions) -> Iterator[pb.FramesRequest]:
    """FramesRequests of up to `per_message` frames each, the stream's options on the first."""
    packer = Packer(per_message, options)
    for frame in frames:
        msg = packer.add(frame)
        if msg is not None:
            yield msg
    msg = packer.last()
    if msg is not None:
        yield msg


async def async_requests(frames, per_message: int, options: pb.FrameStreamOptions):
    """`requests` for an async iterable of frames (a live source)."""
    packer = Packer(per_message, options)
    async for frame in frames:
        msg = packer.add(frame)
        if msg is not None:
            yield msg
    msg = packer.last()
    if msg is not None:
        yield msg


def outputs(msg: pb.FramesResponse, width: int, names: Sequence[str], as_numpy: bool) -> list[FrameOutput]:
    """One FrameOutput per frame of a response."""
    if as_numpy:
        import numpy as np  # the caller passed a numpy array: numpy is there
        rows = np.asarray(msg.values, dtype=np.float32).reshape(msg.frames, width)  # one conversion per message
    else:
        values = list(msg.values)
        rows = [values[i * width:(i + 1) * width] for i in range(msg.frames)]
    first = msg.frames_total - msg.frames  # the index of the message's first frame
    classes = list(msg.classes)
    out = []
    for i in range(msg.frames):
        label = classes[i] if i < len(classes) else None
        name = names[label] if label is not None and label < len(names) else None
        out.append(FrameOutput(first + i, rows[i], label, name))
    return out


def prepare(frames, standardize: str, mode: str, per_message: int = 1):
    """(rows to send, whether outputs are numpy): a numpy array becomes lists of floats; with the
    model's per-sequence standardisation a whole sequence is standardised here (the server cannot)."""
    check_stream_args(per_message, standardize)
    as_numpy = _is_numpy(frames)
    rows = as_rows(frames)
    if mode == "sequence" and standardize == "auto":
        if not is_whole(rows):
            raise InvalidArgumentError("INVALID_ARGUMENT: frames: this model standardises each sequence by its own "
                                       "statistics, which need the whole sequence; pass an array or a list, or "
                                       "standardise the frames yourself and pass standardize=\"none\"")
        rows = standardize_sequence([[float(v) for v in r] for r in rows])
    return rows, as_numpy


def check_stream_args(per_message: int, standardize: str) -> None:
    if not isinstance(per_message, int) or per_message < 1:
        raise InvalidArgumentError(f"INVALID_ARGUMENT: frames_per_message: is {per_message!r}; allowed: an integer >= 1")
    if standardize not in ("auto", "none"):
        raise InvalidArgumentError(f"INVALID_ARGUMENT: standardize: is {standardize!r}; allowed auto (as the model "
                                   "was trained) or none (the frames are ready)")
