"""Small factories for frontend tests: a byte-level fake tokenizer and an in-process stack
(tiny random-weight engine -> gRPC worker -> WorkerPool -> FastAPI app on uvicorn, loopback,
free ports) that runs in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from typing import Any

from splitserve.frontend.tokenizer import Tokenizer


class FakeHFTokenizer:
    """Byte-level tokenizer: token id = one UTF-8 byte (ids < vocab_size), EOS = 2.

    Multi-byte characters span several tokens, like real byte-level BPE; a chat template
    renders `<role>content\\n` and ends with `<assistant>`.
    """

    chat_template = "fake"
    eos_token_id = 2
    bos_token_id = None
    all_special_ids = [2]

    def __init__(self, vocab_size: int = 256) -> None:
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = True, clean_up_tokenization_spaces=None) -> str:
        data = bytes(i for i in ids if not (skip_special_tokens and i in self.all_special_ids))
        return data.decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return f"<0x{token_id:02X}>"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def fake_tokenizer(vocab_size: int = 256) -> Tokenizer:
    return Tokenizer(FakeHFTokenizer(vocab_size), eos_token_ids=(2,))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    """Handles of a running in-process stack."""

    url: str
    hosts: list[Any]
    pool: Any
    app: Any
    server: Any
    extra: dict[str, Any] = field(default_factory=dict)

    def worker_stats(self, i: int = 0):
        return self.hosts[i].engine.stats()


@contextlib.asynccontextmanager
async def inprocess_stack(
    num_workers: int = 1,
    *,
    api_key: str | None = None,
    max_model_len: int | None = None,
    num_kv_blocks: int = 64,
    stats_interval_s: float = 0.2,
    with_workers: bool = True,
    router: Any = None,
):
    """Tiny engines behind real gRPC workers, a real app on uvicorn; yields a Stack.
    `router` (a RouterConfig) turns the frontend's KV-aware routing on."""
    import uvicorn

    from splitserve.engine.async_engine import AsyncEngine
    from splitserve.engine.config import EngineConfig
    from splitserve.frontend.app import create_app
    from splitserve.frontend.config import FrontendConfig
    from splitserve.frontend.worker_pool import WorkerPool
    from splitserve.runtime.worker_host import WorkerConfig, WorkerHost
    from tests.engine.factories import tiny_engine, tiny_model_config

    cfg = tiny_model_config()
    hosts = []
    pool = WorkerPool(stats_interval_s=stats_interval_s)
    try:
        for i in range(num_workers if with_workers else 0):
            eng = tiny_engine(cfg, seed=0, num_kv_blocks=num_kv_blocks)
            aeng = AsyncEngine(eng.config, engine=eng)
            await aeng.start()
            host = WorkerHost(WorkerConfig(role="decode", worker_id=f"decode-{i}",
                                           engine=EngineConfig(model="tiny", dtype="float32")),
                              engine=aeng)
            await host.start()
            hosts.append(host)
            pool.add(f"decode-{i}", "decode", host.address)
        config = FrontendConfig(model="tiny", served_model_names=("tiny",), port=0,
                                api_key=api_key, max_model_len=max_model_len,
                                stats_interval_s=stats_interval_s, router=router)
        app = create_app(config, pool, fake_tokenizer(cfg.vocab_size), model_name="tiny",
                         model_max_len=cfg.max_position_embeddings)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sock.setblocking(False)
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                               lifespan="on"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        try:
            yield Stack(url=f"http://127.0.0.1:{port}", hosts=hosts, pool=pool, app=app,
                        server=server)
        finally:
            server.should_exit = True
            await task
            sock.close()
    finally:
        for host in hosts:
            await host.stop(grace=0)
        await pool.close()


async def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())
