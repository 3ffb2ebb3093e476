# ruff: noqa
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVHeader(_message.Message):
    __slots__ = ("request_id", "dst_block_ids", "dtype", "shape", "nbytes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    dst_block_ids: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    def __init__(self, request_id: _Optional[str] = ..., dst_block_ids: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushKVReply(_message.Message):
    __slots__ = ("status", "error")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[PushKVReply.Status]
        REJECTED: _ClassVar[PushKVReply.Status]
        ERROR: _ClassVar[PushKVReply.Status]
    OK: PushKVReply.Status
    REJECTED: PushKVReply.Status
    ERROR: PushKVReply.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    status: PushKVReply.Status
    error: str
    def __init__(self, status: _Optional[_Union[PushKVReply.Status, str]] = ..., error: _Optional[str] = ...) -> None: ...

class KVControl(_message.Message):
    __slots__ = ("hello", "dist_pair", "dist_paired", "ipc_pair", "ipc_paired", "begin", "layers", "end", "abort", "reply", "bye")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    DIST_PAIR_FIELD_NUMBER: _ClassVar[int]
    DIST_PAIRED_FIELD_NUMBER: _ClassVar[int]
    IPC_PAIR_FIELD_NUMBER: _ClassVar[int]
    IPC_PAIRED_FIELD_NUMBER: _ClassVar[int]
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    BYE_FIELD_NUMBER: _ClassVar[int]
    hello: KVHello
    dist_pair: DistPair
    dist_paired: DistPaired
    ipc_pair: IpcPair
    ipc_paired: IpcPaired
    begin: KVBegin
    layers: KVLayers
    end: KVEnd
    abort: KVAbort
    reply: KVReply
    bye: KVBye
    def __init__(self, hello: _Optional[_Union[KVHello, _Mapping]] = ..., dist_pair: _Optional[_Union[DistPair, _Mapping]] = ..., dist_paired: _Optional[_Union[DistPaired, _Mapping]] = ..., ipc_pair: _Optional[_Union[IpcPair, _Mapping]] = ..., ipc_paired: _Optional[_Union[IpcPaired, _Mapping]] = ..., begin: _Optional[_Union[KVBegin, _Mapping]] = ..., layers: _Optional[_Union[KVLayers, _Mapping]] = ..., end: _Optional[_Union[KVEnd, _Mapping]] = ..., abort: _Optional[_Union[KVAbort, _Mapping]] = ..., reply: _Optional[_Union[KVReply, _Mapping]] = ..., bye: _Optional[_Union[KVBye, _Mapping]] = ...) -> None: ...

class KVHello(_message.Message):
    __slots__ = ("nonce", "mac")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    nonce: str
    mac: str
    def __init__(self, nonce: _Optional[str] = ..., mac: _Optional[str] = ...) -> None: ...

class DistPair(_message.Message):
    __slots__ = ("timeout_s",)
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    timeout_s: float
    def __init__(self, timeout_s: _Optional[float] = ...) -> None: ...

class DistPaired(_message.Message):
    __slots__ = ("pair_id", "store_port")
    PAIR_ID_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    pair_id: int
    store_port: int
    def __init__(self, pair_id: _Optional[int] = ..., store_port: _Optional[int] = ...) -> None: ...

class IpcPair(_message.Message):
    __slots__ = ("event_handle",)
    EVENT_HANDLE_FIELD_NUMBER: _ClassVar[int]
    event_handle: bytes
    def __init__(self, event_handle: _Optional[bytes] = ...) -> None: ...

class IpcPaired(_message.Message):
    __slots__ = ("memory_handle", "offset", "shape", "dtype")
    MEMORY_HANDLE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    memory_handle: bytes
    offset: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, memory_handle: _Optional[bytes] = ..., offset: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class KVBegin(_message.Message):
    __slots__ = ("seq", "request_id", "dst_block_ids", "timeout_s", "dtype", "block_shape")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DST_BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SHAPE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    request_id: str
    dst_block_ids: _containers.RepeatedScalarFieldContainer[int]
    timeout_s: float
    dtype: str
    block_shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq: _Optional[int] = ..., request_id: _Optional[str] = ..., dst_block_ids: _Optional[_Iterable[int]] = ..., timeout_s: _Optional[float] = ..., dtype: _Optional[str] = ..., block_shape: _Optional[_Iterable[int]] = ...) -> None: ...

class KVLayers(_message.Message):
    __slots__ = ("seq", "lo", "hi", "numel")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LO_FIELD_NUMBER: _ClassVar[int]
    HI_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    seq: int
    lo: int
    hi: int
    numel: int
    def __init__(self, seq: _Optional[int] = ..., lo: _Optional[int] = ..., hi: _Optional[int] = ..., numel: _Optional[int] = ...) -> None: ...

class KVEnd(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class KVAbort(_message.Message):
    __slots__ = ("seq", "reason")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    seq: int
    reason: str
    def __init__(self, seq: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class KVReply(_message.Message):
    __slots__ = ("seq", "status", "error")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[KVReply.Status]
        OK: _ClassVar[KVReply.Status]
        ACCEPTED: _ClassVar[KVReply.Status]
        REJECTED: _ClassVar[KVReply.Status]
        ABORTED: _ClassVar[KVReply.Status]
        LATE: _ClassVar[KVReply.Status]
    STATUS_UNSPECIFIED: KVReply.Status
    OK: KVReply.Status
    ACCEPTED: KVReply.Status
    REJECTED: KVReply.Status
    ABORTED: KVReply.Status
    LATE: KVReply.Status
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    seq: int
    status: KVReply.Status
    error: str
    def __init__(self, seq: _Optional[int] = ..., status: _Optional[_Union[KVReply.Status, str]] = ..., error: _Optional[str] = ...) -> None: ...

class KVBye(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
