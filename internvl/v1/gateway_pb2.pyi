from internvl.v1 import decoder_pb2 as _decoder_pb2
from internvl.v1 import vision_pb2 as _vision_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageLayout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_LAYOUT_SEPARATE: _ClassVar[ImageLayout]
    IMAGE_LAYOUT_COMBINED: _ClassVar[ImageLayout]
IMAGE_LAYOUT_SEPARATE: ImageLayout
IMAGE_LAYOUT_COMBINED: ImageLayout

class ChatRequest(_message.Message):
    __slots__ = ("session_id", "text", "images", "video", "image_layout", "tiling", "generation", "model")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    IMAGE_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    images: _containers.RepeatedCompositeFieldContainer[_vision_pb2.ImageInput]
    video: _vision_pb2.VideoInput
    image_layout: ImageLayout
    tiling: _vision_pb2.TilingOptions
    generation: _decoder_pb2.SamplingParams
    model: str
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., images: _Optional[_Iterable[_Union[_vision_pb2.ImageInput, _Mapping]]] = ..., video: _Optional[_Union[_vision_pb2.VideoInput, _Mapping]] = ..., image_layout: _Optional[_Union[ImageLayout, str]] = ..., tiling: _Optional[_Union[_vision_pb2.TilingOptions, _Mapping]] = ..., generation: _Optional[_Union[_decoder_pb2.SamplingParams, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class GroundingBox(_message.Message):
    __slots__ = ("label", "image_index", "x1", "y1", "x2", "y2", "normalized")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    IMAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    label: str
    image_index: int
    x1: float
    y1: float
    x2: float
    y2: float
    normalized: bool
    def __init__(self, label: _Optional[str] = ..., image_index: _Optional[int] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ..., normalized: _Optional[bool] = ...) -> None: ...

class ChatResponse(_message.Message):
    __slots__ = ("text", "finish_reason", "usage", "session_id", "boxes")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: _decoder_pb2.FinishReason
    usage: _decoder_pb2.Usage
    session_id: str
    boxes: _containers.RepeatedCompositeFieldContainer[GroundingBox]
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[_decoder_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_decoder_pb2.Usage, _Mapping]] = ..., session_id: _Optional[str] = ..., boxes: _Optional[_Iterable[_Union[GroundingBox, _Mapping]]] = ...) -> None: ...

class ChatStreamResponse(_message.Message):
    __slots__ = ("text", "finish_reason", "usage", "session_id", "boxes")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: _decoder_pb2.FinishReason
    usage: _decoder_pb2.Usage
    session_id: str
    boxes: _containers.RepeatedCompositeFieldContainer[GroundingBox]
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[_decoder_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_decoder_pb2.Usage, _Mapping]] = ..., session_id: _Optional[str] = ..., boxes: _Optional[_Iterable[_Union[GroundingBox, _Mapping]]] = ...) -> None: ...

class BatchChatRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ChatRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[ChatRequest, _Mapping]]] = ...) -> None: ...

class BatchChatResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[ChatResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[ChatResponse, _Mapping]]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("system_message", "ttl_seconds")
    SYSTEM_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    system_message: str
    ttl_seconds: int
    def __init__(self, system_message: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class SessionTurn(_message.Message):
    __slots__ = ("user", "assistant", "image_hashes")
    USER_FIELD_NUMBER: _ClassVar[int]
    ASSISTANT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HASHES_FIELD_NUMBER: _ClassVar[int]
    user: str
    assistant: str
    image_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user: _Optional[str] = ..., assistant: _Optional[str] = ..., image_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "system_message", "turns", "expires_at_unix")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    system_message: str
    turns: _containers.RepeatedCompositeFieldContainer[SessionTurn]
    expires_at_unix: int
    def __init__(self, session_id: _Optional[str] = ..., system_message: _Optional[str] = ..., turns: _Optional[_Iterable[_Union[SessionTurn, _Mapping]]] = ..., expires_at_unix: _Optional[int] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
