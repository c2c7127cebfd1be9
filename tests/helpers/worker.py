"""An in-process worker (WorkerHost + gRPC server on loopback) over a tiny random-weight engine."""

from __future__ import annotations

from typing import Any

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.config import EngineConfig
from splitserve.runtime.worker_host import WorkerConfig, WorkerHost
from tests.engine.factories import tiny_engine, tiny_model_config


async def start_tiny_worker(role: str = "decode", worker_id: str = "d0", num_kv_blocks: int = 64,
                            **config: Any) -> WorkerHost:
    """A started worker of `role`; `config` goes to WorkerConfig. Stop it with host.stop()."""
    eng = tiny_engine(tiny_model_config(), num_kv_blocks=num_kv_blocks)
    aeng = AsyncEngine(eng.config, engine=eng)
    await aeng.start()
    host = WorkerHost(WorkerConfig(role=role, worker_id=worker_id,
                                   engine=EngineConfig(model="tiny", dtype="float32"), **config),
                      engine=aeng)
    await host.start()
    return host
