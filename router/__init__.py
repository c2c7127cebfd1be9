"""The KV-aware router: a global index of the workers' cached blocks fed by their KV
events, a load view, and the cost model that picks prefill and decode workers.

    from splitserve.router import Router, RouterConfig, Role, NoWorkerAvailable
    from splitserve.router.events import KvEventPublisher   # worker side (BlockPool event_sink)
    from splitserve.router.service import KvEventServer, KvEventSubscriber  # event plane (gRPC)
"""

from splitserve.router.config import RouterConfig
from splitserve.router.errors import (
    BlockSizeMismatch,
    EventGap,
    KvEventsUnsupported,
    NoWorkerAvailable,
    RouterError,
    UnknownWorker,
)
from splitserve.router.index import ApplyResult, KvIndex
from splitserve.router.policy import Role
from splitserve.router.router import Router, Selection

__all__ = [
    "ApplyResult",
    "BlockSizeMismatch",
    "EventGap",
    "KvEventsUnsupported",
    "KvIndex",
    "NoWorkerAvailable",
    "Role",
    "Router",
    "RouterConfig",
    "RouterError",
    "Selection",
    "UnknownWorker",
]
