"""A frontend and a decode worker started as separate processes meet in a real etcd and
serve the `openai` client; SIGTERM on the worker deregisters it at once (the frontend's
/health drops to 0 decode workers, 503), lets the stream it is serving finish, and exits 0."""

from __future__ import annotations

import os
import threading
import time
import uuid

import openai
import pytest

from splitserve.runtime.process import ChildProcess, splitserve_argv
from tests.helpers.serve import health, skip_without_model

pytestmark = pytest.mark.live

ENGINE = ["--dtype", "auto", "--num-threads", "1", "--kv-cache-memory", "256MiB",
          "--max-model-len", "512"]
READY_TIMEOUT_S = 60.0


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"{what}: not within {timeout_s}s")
        time.sleep(interval_s)
    return time.monotonic() - start


@pytest.fixture
def children():
    """Start `splitserve` subcommands as children; SIGTERM (then SIGKILL) them at teardown."""
    started: list[ChildProcess] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def spawn(name: str, *args: str) -> ChildProcess:
        child = ChildProcess(name, splitserve_argv("--log-level", "WARNING", *args), env=env)
        started.append(child.start())
        return child

    yield spawn
    for child in reversed(started):
        child.terminate()
    for child in reversed(started):
        if child.wait(10) is None:
            child.kill()
            child.wait(5)


def start_pair(etcd_server, children):
    """A decode worker and a frontend, separate processes meeting in a fresh etcd namespace;
    returns (worker, frontend base URL, openai client) once /health counts the worker."""
    skip_without_model()
    url = f"{etcd_server.url}/e2e-{uuid.uuid4().hex[:10]}"
    worker = children("worker", "worker", "--role", "decode", "--port", "0",
                      "--worker-id", "decode-e2e", "--discovery", url, *ENGINE)
    frontend = children("frontend", "frontend", "--port", "0", "--discovery", url)
    worker.wait_ready(READY_TIMEOUT_S)
    base = frontend.wait_ready(READY_TIMEOUT_S)["url"]
    wait_for(lambda: health(base)[1].get("workers", {}).get("decode", 0) == 1, 20,
             "frontend /health counts the decode worker")
    status, body = health(base)
    assert status == 200 and body["status"] == "ok", body
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=60)
    return worker, base, client


def wait_deregistered(base: str) -> None:
    """The frontend drops the worker within a few seconds of its SIGTERM (not its TTL)."""
    wait_for(lambda: health(base)[1].get("workers", {}).get("decode", 0) == 0, 5,
             "frontend /health drops the deregistered worker")
    status, body = health(base)
    assert status == 503 and body["status"] == "unavailable", body


def test_separate_processes_meet_in_etcd_and_leave_on_sigterm(etcd_server, children):
    worker, base, client = start_pair(etcd_server, children)
    r = client.chat.completions.create(model="smollm2-135m", max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": "Hi!"}])
    assert r.choices[0].message.content
    assert r.usage.completion_tokens > 0

    worker.terminate()  # SIGTERM: deregister, drain, exit 0
    wait_deregistered(base)
    assert worker.wait(30) == 0
    # nobody serves now: a new request is refused at once, not hung
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="smollm2-135m", max_tokens=4,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert err.value.status_code == 503


def test_stream_in_flight_at_sigterm_finishes(etcd_server, children):
    worker, base, client = start_pair(etcd_server, children)
    stream = client.chat.completions.create(
        model="smollm2-135m", max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": "Count from one to twenty."}])
    chunks = iter(stream)
    first = next(chunks)  # the request is running on the worker
    assert first.choices and first.choices[0].delta.role == "assistant"
    rest: list = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            rest.extend(chunks)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    worker.terminate()  # SIGTERM while the stream runs
    reader.start()
    wait_deregistered(base)
    reader.join(30)
    assert not reader.is_alive(), "the in-flight stream did not finish"
    assert not errors, f"the in-flight stream broke: {errors[0]!r}"
    finish = [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"], finish  # every max_token, not cut off by the shutdown
    usage = [c.usage for c in rest if c.usage is not None]
    assert usage and usage[-1].completion_tokens == 24
    assert worker.wait(30) == 0
