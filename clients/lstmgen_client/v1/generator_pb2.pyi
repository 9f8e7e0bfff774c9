from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP_SEQUENCE: _ClassVar[FinishReason]
    FINISH_REASON_END_OF_TEXT: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP_SEQUENCE: FinishReason
FINISH_REASON_END_OF_TEXT: FinishReason

class FramesRequest(_message.Message):
    __slots__ = ("values", "options")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    options: FrameStreamOptions
    def __init__(self, values: _Optional[_Iterable[float]] = ..., options: _Optional[_Union[FrameStreamOptions, _Mapping]] = ...) -> None: ...

class FrameStreamOptions(_message.Message):
    __slots__ = ("final_only", "state", "return_state")
    FINAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RETURN_STATE_FIELD_NUMBER: _ClassVar[int]
    final_only: bool
    state: bytes
    return_state: bool
    def __init__(self, final_only: _Optional[bool] = ..., state: _Optional[bytes] = ..., return_state: _Optional[bool] = ...) -> None: ...

class FramesResponse(_message.Message):
    __slots__ = ("values", "frames", "classes", "finished", "frames_total", "state")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    frames: int
    classes: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    frames_total: int
    state: bytes
    def __init__(self, values: _Optional[_Iterable[float]] = ..., frames: _Optional[int] = ..., classes: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., frames_total: _Optional[int] = ..., state: _Optional[bytes] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "greedy", "stop", "skip_unknown", "state", "return_state", "state_every", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs", "logit_bias")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    GREEDY_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SKIP_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RETURN_STATE_FIELD_NUMBER: _ClassVar[int]
    STATE_EVERY_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    greedy: bool
    stop: _containers.RepeatedScalarFieldContainer[str]
    skip_unknown: bool
    state: bytes
    return_state: bool
    state_every: int
    min_p: float
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    logprobs: bool
    top_logprobs: int
    logit_bias: _containers.ScalarMap[int, float]
    def __init__(self, prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., greedy: _Optional[bool] = ..., stop: _Optional[_Iterable[str]] = ..., skip_unknown: _Optional[bool] = ..., state: _Optional[bytes] = ..., return_state: _Optional[bool] = ..., state_every: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., logit_bias: _Optional[_Mapping[int, float]] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("reason", "prompt_tokens", "generated_tokens", "seed", "stop_sequence", "held_text")
    REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    HELD_TEXT_FIELD_NUMBER: _ClassVar[int]
    reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int
    stop_sequence: str
    held_text: str
    def __init__(self, reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., stop_sequence: _Optional[str] = ..., held_text: _Optional[str] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "text", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "text", "logprob", "top")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    text: str
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_count", "finished", "logprobs", "state")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_count: int
    finished: Finished
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    state: bytes
    def __init__(self, text: _Optional[str] = ..., token_count: _Optional[int] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., state: _Optional[bytes] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("include_vocabulary",)
    INCLUDE_VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    include_vocabulary: bool
    def __init__(self, include_vocabulary: _Optional[bool] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_prompt_chars", "max_new_tokens", "default_new_tokens", "max_stop_sequences", "max_stop_sequence_chars", "max_concurrent_streams", "max_queued_streams", "max_request_bytes", "max_top_logprobs", "min_temperature", "max_state_bytes", "max_frames_per_message", "max_request_output", "max_unread_output")
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_SEQUENCE_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_STREAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MIN_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_FRAMES_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_UNREAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    max_prompt_chars: int
    max_new_tokens: int
    default_new_tokens: int
    max_stop_sequences: int
    max_stop_sequence_chars: int
    max_concurrent_streams: int
    max_queued_streams: int
    max_request_bytes: int
    max_top_logprobs: int
    min_temperature: float
    max_state_bytes: int
    max_frames_per_message: int
    max_request_output: int
    max_unread_output: int
    def __init__(self, max_prompt_chars: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., default_new_tokens: _Optional[int] = ..., max_stop_sequences: _Optional[int] = ..., max_stop_sequence_chars: _Optional[int] = ..., max_concurrent_streams: _Optional[int] = ..., max_queued_streams: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., max_top_logprobs: _Optional[int] = ..., min_temperature: _Optional[float] = ..., max_state_bytes: _Optional[int] = ..., max_frames_per_message: _Optional[int] = ..., max_request_output: _Optional[int] = ..., max_unread_output: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("level", "vocab_size", "num_layers", "hidden_size", "embedding_size", "quantization", "execution_provider", "model_sha256", "limits", "provenance_json", "vocabulary", "has_prompt_graph", "state_bytes", "state_signed", "kind", "cell", "task", "input_size", "output_size", "class_names", "standardize")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_SIZE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_JSON_FIELD_NUMBER: _ClassVar[int]
    VOCABULARY_FIELD_NUMBER: _ClassVar[int]
    HAS_PROMPT_GRAPH_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_SIGNED_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLASS_NAMES_FIELD_NUMBER: _ClassVar[int]
    STANDARDIZE_FIELD_NUMBER: _ClassVar[int]
    level: str
    vocab_size: int
    num_layers: int
    hidden_size: int
    embedding_size: int
    quantization: str
    execution_provider: str
    model_sha256: str
    limits: Limits
    provenance_json: str
    vocabulary: _containers.RepeatedScalarFieldContainer[str]
    has_prompt_graph: bool
    state_bytes: int
    state_signed: bool
    kind: str
    cell: str
    task: str
    input_size: int
    output_size: int
    class_names: _containers.RepeatedScalarFieldContainer[str]
    standardize: str
    def __init__(self, level: _Optional[str] = ..., vocab_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., embedding_size: _Optional[int] = ..., quantization: _Optional[str] = ..., execution_provider: _Optional[str] = ..., model_sha256: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., provenance_json: _Optional[str] = ..., vocabulary: _Optional[_Iterable[str]] = ..., has_prompt_graph: _Optional[bool] = ..., state_bytes: _Optional[int] = ..., state_signed: _Optional[bool] = ..., kind: _Optional[str] = ..., cell: _Optional[str] = ..., task: _Optional[str] = ..., input_size: _Optional[int] = ..., output_size: _Optional[int] = ..., class_names: _Optional[_Iterable[str]] = ..., standardize: _Optional[str] = ...) -> None: ...
