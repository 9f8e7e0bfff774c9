"""What the client returns: plain dataclasses, never protobuf."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Finished:
    reason: str  # "length" | "stop_sequence" | "end_of_text"
    prompt_tokens: int
    generated_tokens: int
    seed: int
    stop_sequence: str = ""
    held_text: str = ""  # with return_state, ended by length: text kept in the state, not sent


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before penalties, temperature and
    filtering) and, with top_logprobs, the most likely alternatives at that position."""

    token_id: int
    text: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class StreamChunk:
    text: str
    token_count: int
    finished: Finished | None = None  # set on the last chunk only
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token, with logprobs=True
    state: bytes | None = None  # the model's state after this chunk (return_state, state_every)


@dataclass(frozen=True)
class GenerateResult:
    text: str
    finished: Finished
    messages: int  # stream messages the text arrived in
    logprobs: tuple[TokenLogprob, ...] = ()  # one per generated token, with logprobs=True
    state: bytes | None = None  # with return_state: continue from it with generate(..., state=...)

    @property
    def finish_reason(self) -> str:
        return self.finished.reason

    @property
    def seed(self) -> int:
        return self.finished.seed


@dataclass(frozen=True)
class ServerLimits:
    """The limits a server reports (GetModelInfo): what one request may ask of it."""

    max_prompt_chars: int
    max_new_tokens: int
    default_new_tokens: int
    max_stop_sequences: int
    max_stop_sequence_chars: int
    max_concurrent_streams: int
    max_queued_streams: int
    max_request_bytes: int = 0  # 0: a server older than this field
    max_top_logprobs: int = 0  # likewise
    min_temperature: float = 0.0  # temperatures below this decode greedily
    max_state_bytes: int = 0  # largest state a request may carry
    max_frames_per_message: int = 0  # frame models: most frames in one message
    max_request_output: int = 0  # output entries a request not read as it comes may make the server hold
    max_unread_output: int = 0  # entries a stream holds unread before its generation waits for the reader


Limits = ServerLimits  # its earlier name, kept for existing client code


@dataclass(frozen=True)
class ModelInfo:
    level: str
    vocab_size: int
    num_layers: int
    hidden_size: int
    embedding_size: int
    quantization: str
    execution_provider: str
    model_sha256: str
    has_prompt_graph: bool
    limits: ServerLimits
    provenance: dict = field(default_factory=dict)
    vocabulary: tuple[str, ...] = ()
    state_bytes: int = 0  # bytes of one state blob (without penalty history)
    state_signed: bool = False  # the server signs its states (--state-key)
    kind: str = "text"  # or "frames": float frames in, outputs out (Client.stream_frames)
    cell: str = "lstm"  # or "gru", "peephole", "cifg"
    task: str = ""  # frame models: "regression" or "classification"
    input_size: int = 0  # frame models: floats per input frame
    output_size: int = 0  # ... per output (classes, for classification)
    class_names: tuple[str, ...] = ()
    standardize: str = ""  # frame models: "none", "global" (by the server) or "sequence" (by the client)
