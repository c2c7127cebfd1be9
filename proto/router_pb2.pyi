from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RouteRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "pool", "remote_kv", "candidates", "client_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    REMOTE_KV_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    pool: str
    remote_kv: bool
    candidates: _containers.RepeatedScalarFieldContainer[str]
    client_id: str
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., pool: _Optional[str] = ..., remote_kv: _Optional[bool] = ..., candidates: _Optional[_Iterable[str]] = ..., client_id: _Optional[str] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("known", "worker_address", "worker_id", "overlap_blocks", "num_blocks")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    WORKER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    known: bool
    worker_address: str
    worker_id: str
    overlap_blocks: int
    num_blocks: int
    def __init__(self, known: _Optional[bool] = ..., worker_address: _Optional[str] = ..., worker_id: _Optional[str] = ..., overlap_blocks: _Optional[int] = ..., num_blocks: _Optional[int] = ...) -> None: ...

class MarkRequest(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class MarkResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UncachedTokensRequest(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class UncachedTokensResponse(_message.Message):
    __slots__ = ("uncached_tokens",)
    UNCACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    uncached_tokens: int
    def __init__(self, uncached_tokens: _Optional[int] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "role", "address", "state")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    role: str
    address: str
    state: str
    def __init__(self, worker_id: _Optional[str] = ..., role: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[str] = ...) -> None: ...

class AddWorkerRequest(_message.Message):
    __slots__ = ("worker",)
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: WorkerInfo
    def __init__(self, worker: _Optional[_Union[WorkerInfo, _Mapping]] = ...) -> None: ...

class AddWorkerResponse(_message.Message):
    __slots__ = ("added", "worker_id")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    added: bool
    worker_id: str
    def __init__(self, added: _Optional[bool] = ..., worker_id: _Optional[str] = ...) -> None: ...

class RemoveWorkerRequest(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class RemoveWorkerResponse(_message.Message):
    __slots__ = ("removed",)
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    removed: bool
    def __init__(self, removed: _Optional[bool] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ...) -> None: ...

class RouterStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouterStatsResponse(_message.Message):
    __slots__ = ("mode", "block_size", "requests", "remote_prefills", "prompt_blocks", "overlap_blocks", "no_worker", "prefix_hit_rate", "indexed_blocks", "tracked_requests", "fallback_picks", "resyncs", "workers", "routed", "routed_overlap_blocks", "clients")
    class RoutedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class RoutedOverlapBlocksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class ClientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    MODE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REMOTE_PREFILLS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NO_WORKER_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    INDEXED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TRACKED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_PICKS_FIELD_NUMBER: _ClassVar[int]
    RESYNCS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROUTED_FIELD_NUMBER: _ClassVar[int]
    ROUTED_OVERLAP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    block_size: int
    requests: int
    remote_prefills: int
    prompt_blocks: int
    overlap_blocks: int
    no_worker: int
    prefix_hit_rate: float
    indexed_blocks: int
    tracked_requests: int
    fallback_picks: int
    resyncs: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    routed: _containers.ScalarMap[str, int]
    routed_overlap_blocks: _containers.ScalarMap[str, int]
    clients: _containers.ScalarMap[str, int]
    def __init__(self, mode: _Optional[str] = ..., block_size: _Optional[int] = ..., requests: _Optional[int] = ..., remote_prefills: _Optional[int] = ..., prompt_blocks: _Optional[int] = ..., overlap_blocks: _Optional[int] = ..., no_worker: _Optional[int] = ..., prefix_hit_rate: _Optional[float] = ..., indexed_blocks: _Optional[int] = ..., tracked_requests: _Optional[int] = ..., fallback_picks: _Optional[int] = ..., resyncs: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., routed: _Optional[_Mapping[str, int]] = ..., routed_overlap_blocks: _Optional[_Mapping[str, int]] = ..., clients: _Optional[_Mapping[str, int]] = ...) -> None: ...

class RouterHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouterHealthResponse(_message.Message):
    __slots__ = ("status", "num_workers")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    status: str
    num_workers: int
    def __init__(self, status: _Optional[str] = ..., num_workers: _Optional[int] = ...) -> None: ...
