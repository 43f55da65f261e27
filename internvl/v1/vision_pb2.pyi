from internvl.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TilingOptions(_message.Message):
    __slots__ = ("max_tiles", "min_tiles", "use_thumbnail")
    MAX_TILES_FIELD_NUMBER: _ClassVar[int]
    MIN_TILES_FIELD_NUMBER: _ClassVar[int]
    USE_THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    max_tiles: int
    min_tiles: int
    use_thumbnail: bool
    def __init__(self, max_tiles: _Optional[int] = ..., min_tiles: _Optional[int] = ..., use_thumbnail: _Optional[bool] = ...) -> None: ...

class ImageInput(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class VideoInput(_message.Message):
    __slots__ = ("data", "num_segments", "start_seconds", "end_seconds")
    DATA_FIELD_NUMBER: _ClassVar[int]
    NUM_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    START_SECONDS_FIELD_NUMBER: _ClassVar[int]
    END_SECONDS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    num_segments: int
    start_seconds: float
    end_seconds: float
    def __init__(self, data: _Optional[bytes] = ..., num_segments: _Optional[int] = ..., start_seconds: _Optional[float] = ..., end_seconds: _Optional[float] = ...) -> None: ...

class ImageList(_message.Message):
    __slots__ = ("images",)
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageInput]
    def __init__(self, images: _Optional[_Iterable[_Union[ImageInput, _Mapping]]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("images", "video", "tiling", "dtype")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    VIDEO_FIELD_NUMBER: _ClassVar[int]
    TILING_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    images: ImageList
    video: VideoInput
    tiling: TilingOptions
    dtype: _tensor_pb2.DType
    def __init__(self, images: _Optional[_Union[ImageList, _Mapping]] = ..., video: _Optional[_Union[VideoInput, _Mapping]] = ..., tiling: _Optional[_Union[TilingOptions, _Mapping]] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ...) -> None: ...

class EmbeddingHeader(_message.Message):
    __slots__ = ("index", "num_tiles", "tensor", "frame_index")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_TILES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    num_tiles: int
    tensor: _tensor_pb2.TensorHeader
    frame_index: int
    def __init__(self, index: _Optional[int] = ..., num_tiles: _Optional[int] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorHeader, _Mapping]] = ..., frame_index: _Optional[int] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: EmbeddingHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[EmbeddingHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("fingerprint", "image_size", "tokens_per_tile", "hidden_size", "default_max_tiles", "default_use_thumbnail", "dtype", "max_request_tiles", "model_name", "family_member", "vision_fingerprint")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_TILE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_TILES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_USE_THUMBNAIL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_TILES_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_MEMBER_FIELD_NUMBER: _ClassVar[int]
    VISION_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    image_size: int
    tokens_per_tile: int
    hidden_size: int
    default_max_tiles: int
    default_use_thumbnail: bool
    dtype: _tensor_pb2.DType
    max_request_tiles: int
    model_name: str
    family_member: str
    vision_fingerprint: str
    def __init__(self, fingerprint: _Optional[str] = ..., image_size: _Optional[int] = ..., tokens_per_tile: _Optional[int] = ..., hidden_size: _Optional[int] = ..., default_max_tiles: _Optional[int] = ..., default_use_thumbnail: _Optional[bool] = ..., dtype: _Optional[_Union[_tensor_pb2.DType, str]] = ..., max_request_tiles: _Optional[int] = ..., model_name: _Optional[str] = ..., family_member: _Optional[str] = ..., vision_fingerprint: _Optional[str] = ...) -> None: ...
