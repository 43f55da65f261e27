from internvl.v1 import tensor_pb2 as _tensor_pb2
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
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]

class WeightQuantization(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WEIGHT_QUANTIZATION_UNSPECIFIED: _ClassVar[WeightQuantization]
    WEIGHT_QUANTIZATION_NONE: _ClassVar[WeightQuantization]
    WEIGHT_QUANTIZATION_INT8: _ClassVar[WeightQuantization]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
WEIGHT_QUANTIZATION_UNSPECIFIED: WeightQuantization
WEIGHT_QUANTIZATION_NONE: WeightQuantization
WEIGHT_QUANTIZATION_INT8: WeightQuantization

class Turn(_message.Message):
    __slots__ = ("user", "assistant")
    USER_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_FIELD_NUMBER: _ClassVar[int]
    user: str
    assistant: str
    def __init__(self, user: _Optional[str] = ..., assistant: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("system_message", "history", "question")
    SYSTEM_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    system_message: str
    history: _containers.RepeatedCompositeFieldContainer[Turn]
    question: str
    def __init__(self, system_message: _Optional[str] = ..., history: _Optional[_Iterable[_Union[Turn, _Mapping]]] = ..., question: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "stop_token_ids")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DO_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, max_new_tokens: _Optional[int] = ..., do_sample: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ImageDescriptor(_message.Message):
    __slots__ = ("num_tiles", "feature_key", "tensor")
    NUM_TILES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_KEY_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    num_tiles: int
    feature_key: str
    tensor: _tensor_pb2.TensorHeader
    def __init__(self, num_tiles: _Optional[int] = ..., feature_key: _Optional[str] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorHeader, _Mapping]] = ...) -> None: ...

class GenerateSetup(_message.Message):
    __slots__ = ("conversation", "sampling", "images", "request_id", "cache_salt", "lazy_images")
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CACHE_SALT_FIELD_NUMBER: _ClassVar[int]
    LAZY_IMAGES_FIELD_NUMBER: _ClassVar[int]
    conversation: Conversation
    sampling: SamplingParams
    images: _containers.RepeatedCompositeFieldContainer[ImageDescriptor]
    request_id: str
    cache_salt: str
    lazy_images: bool
    def __init__(self, conversation: _Optional[_Union[Conversation, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., images: _Optional[_Iterable[_Union[ImageDescriptor, _Mapping]]] = ..., request_id: _Optional[str] = ..., cache_salt: _Optional[str] = ..., lazy_images: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("setup", "chunk")
    SETUP_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    setup: GenerateSetup
    chunk: bytes
    def __init__(self, setup: _Optional[_Union[GenerateSetup, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "cached_prompt_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cached_prompt_tokens: _Optional[int] = ...) -> None: ...

class NeedImages(_message.Message):
    __slots__ = ("indices", "held_bytes")
    INDICES_FIELD_NUMBER: _ClassVar[int]
    HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    indices: _containers.RepeatedScalarFieldContainer[int]
    held_bytes: int
    def __init__(self, indices: _Optional[_Iterable[int]] = ..., held_bytes: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "usage", "need_images")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    NEED_IMAGES_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    usage: Usage
    need_images: NeedImages
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., need_images: _Optional[_Union[NeedImages, _Mapping]] = ...) -> None: ...

class DecoderInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DecoderInfo(_message.Message):
    __slots__ = ("fingerprint", "hidden_size", "tokens_per_tile", "max_context", "dtype", "model_name", "weight_quantization", "weight_bytes", "kv_cache_bytes", "lazy_images", "family_member")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_TILE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAZY_IMAGES_FIELD_NUMBER: _ClassVar[int]
    FAMILY_MEMBER_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    hidden_size: int
    tokens_per_tile: int
    max_context: int
    dtype: _tensor_pb2.DType
    model_name: str
    weight_quantization: WeightQuantization
    weight_bytes: int
    kv_cache_bytes: int
    lazy_images: bool
    family_member: str
    def __init__(self, fingerprint: _Optional[str] = ..., hidden_size: _Optional[int] = ..., tokens_per_tile: _Optional[int] = ..., max_context: _Optional[int] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., model_name: _Optional[str] = ..., weight_quantization: _Optional[_Union[WeightQuantization, str]] = ..., weight_bytes: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., lazy_images: _Optional[bool] = ..., family_member: _Optional[str] = ...) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DecoderLoad(_message.Message):
    __slots__ = ("running_sequences", "waiting_sequences", "kv_blocks_used", "kv_blocks_total", "max_num_seqs", "max_queue_size", "engine_healthy")
    RUNNING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    WAITING_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_HEALTHY_FIELD_NUMBER: _ClassVar[int]
    running_sequences: int
    waiting_sequences: int
    kv_blocks_used: int
    kv_blocks_total: int
    max_num_seqs: int
    max_queue_size: int
    engine_healthy: bool
    def __init__(self, running_sequences: _Optional[int] = ..., waiting_sequences: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., max_num_seqs: _Optional[int] = ..., max_queue_size: _Optional[int] = ..., engine_healthy: _Optional[bool] = ...) -> None: ...
