"""Workers that register with discovery join the frontend's pool, and leave it when they stop."""

import pytest

from splitserve.engine.async_engine import AsyncEngine
from splitserve.engine.config import EngineConfig
from splitserve.frontend.discovery_sync import DiscoverySync
from splitserve.frontend.worker_pool import WorkerPool
from splitserve.runtime.worker_host import WorkerConfig, WorkerHost
from tests.engine.factories import tiny_engine, tiny_model_config

from .fakes import wait_until


async def start_worker(url, worker_id, model="tiny"):
    eng = tiny_engine(tiny_model_config(), num_kv_blocks=16)
    aeng = AsyncEngine(eng.config, engine=eng)
    await aeng.start()
    host = WorkerHost(WorkerConfig(role="decode", worker_id=worker_id, discovery_url=url,
                                   engine=EngineConfig(model=model, dtype="float32")), engine=aeng)
    await host.start()
    return host


@pytest.mark.asyncio
async def test_pool_follows_discovery(tmp_path):
    url = f"embedded://{tmp_path}/disc?poll=0.05"
    pool = WorkerPool()
    sync = DiscoverySync(pool, url, model="tiny")
    hosts = []
    try:
        hosts.append(await start_worker(url, "d0"))
        await sync.start()
        assert await wait_until(lambda: pool.counts()["decode"] == 1, 5)
        assert pool.get("d0").address == hosts[0].address
        hosts.append(await start_worker(url, "d1"))
        hosts.append(await start_worker(url, "other", model="another-model"))
        assert await wait_until(lambda: pool.counts()["decode"] == 2, 5)
        assert pool.get("other") is None  # a different model is left out
        await hosts[0].stop(grace=0)
        assert await wait_until(lambda: pool.get("d0") is None, 5)
        assert [w.worker_id for w in pool.workers()] == ["d1"]
    finally:
        await sync.stop()
        for h in hosts[1:]:
            await h.stop(grace=0)
        await pool.close()
