"""What every KV transport shares: the protocol, the pool layout, peer metadata, block ids.

The pool is one contiguous tensor whose first dimension is the block
(`kv_cache[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]`, docs/contracts.md):
block i is the byte range [i * block_bytes, (i + 1) * block_bytes) from `data_ptr()`, with
`block_bytes = kv_cache[0].nbytes`. Transports only see block ids and bytes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import msgpack
import numpy as np

from .errors import KvTransferError

if TYPE_CHECKING:
    import torch

#: Version of the metadata format; bumped when a field changes meaning.
METADATA_VERSION = 1


class Notification(NamedTuple):
    """A 'pulled' notice seen on the serve side: `peer` (the puller's name) sent `msg`."""

    peer: str
    msg: bytes


@dataclass(frozen=True)
class PoolLayout:
    """Shape of a registered block pool, as peers see it in the metadata."""

    num_blocks: int
    block_bytes: int
    #: Shape of one block (dims after the first), e.g. (layers, 2, block_size, kv_heads, head_dim).
    block_shape: tuple[int, ...]
    #: torch dtype name without the prefix, e.g. "bfloat16".
    dtype: str
    #: "cpu" or "cuda".
    device_type: str
    #: CUDA device index (0 on CPU).
    device_index: int
    #: `data_ptr()` of the pool: remote descriptors are built from it.
    base_addr: int

    @classmethod
    def of(cls, kv_cache: torch.Tensor) -> PoolLayout:
        import torch

        if not isinstance(kv_cache, torch.Tensor):
            raise TypeError(f"kv_cache must be a torch.Tensor, got {type(kv_cache).__name__}")
        if kv_cache.dim() < 2 or kv_cache.shape[0] < 1:
            raise ValueError(f"kv_cache must be [num_blocks, ...] with num_blocks >= 1, got {tuple(kv_cache.shape)}")
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be one contiguous tensor (register the whole pool once)")
        return cls(
            num_blocks=int(kv_cache.shape[0]),
            block_bytes=int(kv_cache[0].nbytes),
            block_shape=tuple(int(d) for d in kv_cache.shape[1:]),
            dtype=str(kv_cache.dtype).removeprefix("torch."),
            device_type=kv_cache.device.type,
            device_index=int(kv_cache.device.index or 0),
            base_addr=int(kv_cache.data_ptr()),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_blocks": self.num_blocks, "block_bytes": self.block_bytes,
            "block_shape": list(self.block_shape), "dtype": self.dtype,
            "device_type": self.device_type, "device_index": self.device_index,
            "base_addr": self.base_addr,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoolLayout:
        return cls(
            num_blocks=int(d["num_blocks"]), block_bytes=int(d["block_bytes"]),
            block_shape=tuple(int(x) for x in d["block_shape"]), dtype=str(d["dtype"]),
            device_type=str(d["device_type"]), device_index=int(d["device_index"]),
            base_addr=int(d["base_addr"]),
        )

    def check_compatible(self, remote: PoolLayout, peer: str) -> None:
        """Raise KvTransferError unless a block of `remote` can be copied into a block of ours."""
        if (remote.block_bytes, remote.block_shape, remote.dtype) != (self.block_bytes, self.block_shape, self.dtype):
            raise KvTransferError(
                f"peer {peer!r} has blocks {remote.dtype}{list(remote.block_shape)} ({remote.block_bytes} B), "
                f"local blocks are {self.dtype}{list(self.block_shape)} ({self.block_bytes} B)",
                peer=peer,
            )


def pack_metadata(kind: str, name: str, layout: PoolLayout, **extra: Any) -> bytes:
    """Metadata a transport publishes (discovery, or a gRPC call) for its peers."""
    return msgpack.packb(
        {"v": METADATA_VERSION, "kind": kind, "name": name, "pool": layout.to_dict(), **extra},
        use_bin_type=True,
    )


def unpack_metadata(metadata: bytes, expected_kind: str) -> dict[str, Any]:
    """Inverse of pack_metadata; KvTransferError when malformed or of another transport kind."""
    try:
        md = msgpack.unpackb(metadata, raw=False)
        version, kind, name = md["v"], md["kind"], md["name"]
        md["pool"] = PoolLayout.from_dict(md["pool"])
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the same error to callers
        raise KvTransferError(f"malformed KV transport metadata: {exc}") from exc
    if version != METADATA_VERSION:
        raise KvTransferError(f"peer {name!r} speaks metadata v{version}, this build v{METADATA_VERSION}", peer=name)
    if kind != expected_kind:
        raise KvTransferError(
            f"peer {name!r} uses the {kind!r} KV transport, this worker uses {expected_kind!r}; "
            "pass the same --kv-transport to every worker",
            peer=name,
        )
    return md


def block_index_array(block_ids: Sequence[int] | np.ndarray, num_blocks: int, what: str) -> np.ndarray:
    """Block ids as an int32 array, checked against the pool size (KvTransferError if not)."""
    arr = np.asarray(block_ids, dtype=np.int64).reshape(-1)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= num_blocks):
        raise KvTransferError(f"{what} block ids out of range [0, {num_blocks}): {arr.min()}..{arr.max()}")
    return arr.astype(np.int32)


def pull_indices(peer: str, remote_layout: PoolLayout, local_layout: PoolLayout,
                 remote_block_ids: Sequence[int], local_block_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Checked (remote, local) block index arrays of one pull (KvTransferError if bad)."""
    remote_idx = block_index_array(remote_block_ids, remote_layout.num_blocks, "remote")
    local_idx = block_index_array(local_block_ids, local_layout.num_blocks, "local")
    if remote_idx.size != local_idx.size:
        raise KvTransferError(
            f"{remote_idx.size} remote block ids but {local_idx.size} local block ids", peer=peer
        )
    return remote_idx, local_idx


@runtime_checkable
class KvTransport(Protocol):
    """Moves whole blocks of one registered pool between workers (see the package docstring)."""

    #: "nixl" or "grpc".
    kind: str
    #: This worker's name on the data plane (NIXL agent name); peers' notices carry it.
    name: str
    layout: PoolLayout

    def local_metadata(self) -> bytes:
        """What a peer passes to add_peer() to pull from this worker (publish it once)."""
        ...

    async def add_peer(self, metadata: bytes) -> str:
        """Load a peer's metadata (once per peer; cached) and return its name."""
        ...

    async def remove_peer(self, peer: str) -> None:
        """Forget a peer (it left or restarted); unknown names are ignored."""
        ...

    async def pull(
        self,
        peer: str,
        remote_block_ids: Sequence[int],
        local_block_ids: Sequence[int],
        notify_msg: bytes = b"",
        timeout_s: float | None = None,
    ) -> None:
        """Copy the peer's blocks into ours, pairwise; then send `notify_msg` to the peer."""
        ...

    def notifications(self, expecting: Callable[[], bool] | None = None) -> AsyncIterator[Notification]:
        """Notices from pullers, forever until close(); keep one consumer running.
        expecting(): True while this side holds blocks pinned for pullers; a transport whose
        pulls need this side's progress (NIXL) then polls more often, and less often than
        without `expecting` while it is False."""
        ...

    def wake(self) -> None:
        """Blocks were just pinned for a puller (call before handing out their handle, on
        the notifications() consumer's loop): a polling transport looks at once."""
        ...

    async def close(self) -> None:
        """Release the registration, peers and servers; idempotent."""
        ...
