"""Worker discovery: who is alive, where, with which model and NIXL metadata.

```python
from splitserve.runtime.discovery import WorkerRecord, open_discovery

disc = await open_discovery("etcd://127.0.0.1:2379")          # or "embedded://mydeploy"
handle = await disc.register(WorkerRecord(id="p0", role="prefill", address="10.0.0.5:9000",
                                          model="smollm2-135m", block_size=16), ttl_s=10)
await disc.list(role="decode")                                  # -> list[WorkerRecord]
async for kind, record in disc.watch():                         # "put" | "delete"
    ...
await disc.deregister(handle)
await disc.close()
```
Backends: `etcd` (etcd v3 leases and watches, see etcd.py) and `embedded` (a directory of
heartbeat files for one host, see embedded.py). README.md beside this file has the why.
"""

from .registry import BACKENDS, backend_class, open_discovery
from .types import (
    DEFAULT_TTL_S,
    ROLES,
    Discovery,
    DiscoveryConfigError,
    DiscoveryError,
    DiscoveryUnavailableError,
    InvalidRecordError,
    Registration,
    WatchEvent,
    WorkerRecord,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_TTL_S",
    "ROLES",
    "Discovery",
    "DiscoveryConfigError",
    "DiscoveryError",
    "DiscoveryUnavailableError",
    "InvalidRecordError",
    "Registration",
    "WatchEvent",
    "WorkerRecord",
    "backend_class",
    "open_discovery",
]
