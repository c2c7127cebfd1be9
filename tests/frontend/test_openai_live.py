"""The default model (SmolLM2) served by real processes — `splitserve worker` and
`splitserve frontend` on loopback — driven with the official `openai` client.

One server per module (model load takes seconds). Greedy chat through the server must equal
the engine's own greedy output for the same token ids.
"""

import asyncio
import os

import grpc
import httpx
import openai
import pytest

from splitserve.runtime.process import ChildProcess, splitserve_argv

pytestmark = pytest.mark.live

API_KEY = "test-key"
MODEL = "smollm2-135m"
MAX_LEN = 1024
ENGINE_FLAGS = ["--dtype", "float32", "--num-threads", "1", "--kv-cache-memory", "64MiB",
                "--max-model-len", str(MAX_LEN)]
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def server():
    try:
        from splitserve.engine.model_loader import default_model_path

        default_model_path()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"default model not installed: {exc}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    children = []
    try:
        worker = ChildProcess("worker", splitserve_argv(
            "--log-level", "WARNING", "worker", "--role", "decode", "--port", "0",
            "--worker-id", "live-decode", *ENGINE_FLAGS), env=env).start()
        children.append(worker)
        wport = worker.wait_ready(300)["port"]
        frontend = ChildProcess("frontend", splitserve_argv(
            "--log-level", "WARNING", "frontend", "--port", "0", "--api-key", API_KEY,
            "--worker", f"decode=127.0.0.1:{wport}", "--stats-interval", "0.2"), env=env).start()
        children.append(frontend)
        url = frontend.wait_ready(300)["url"]
        yield {"url": url, "worker": f"127.0.0.1:{wport}"}
    finally:
        for child in reversed(children):
            child.terminate()
        for child in reversed(children):
            if child.wait(15) is None:
                child.kill()
                child.wait(5)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=API_KEY, max_retries=0)


def worker_stats(server):
    from splitserve.proto import worker_pb2, worker_pb2_grpc

    with grpc.insecure_channel(server["worker"]) as ch:
        return worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)


def wait_blocks_free(server, timeout=10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = worker_stats(server)
        if s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks:
            return True
        time.sleep(0.05)
    return False


def engine_greedy(prompt_ids: list[int], max_tokens: int) -> list[int]:
    """The engine alone, same config as the worker, greedy on the same token ids."""
    from splitserve.engine.async_engine import AsyncEngine
    from splitserve.engine.config import EngineConfig, parse_memory_size
    from splitserve.engine.sampling_params import SamplingParams

    async def run():
        eng = AsyncEngine(EngineConfig(model=MODEL, dtype="float32", num_threads=1,
                                       kv_cache_memory=parse_memory_size("64MiB"),
                                       max_model_len=MAX_LEN, progress=False))
        await eng.start()
        try:
            ids: list[int] = []
            async for out in eng.generate("ref", prompt_ids,
                                          SamplingParams(max_tokens=max_tokens, temperature=0)):
                ids.extend(out.new_token_ids)
            return ids
        finally:
            await eng.shutdown()

    return asyncio.run(run())


def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = httpx.get(server["url"] + "/health")
    assert h.status_code == 200 and h.json() == {"status": "ok", "workers": {"decode": 1, "prefill": 0}}
    m = httpx.get(server["url"] + "/metrics").text
    assert 'splitserve_kv_cache_usage{worker="decode@' in m


def test_greedy_chat_equals_engine(server, client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert text and r.usage.completion_tokens <= 24
    tok = httpx.post(server["url"] + "/tokenize", json={"messages": CHAT}).json()["tokens"]
    assert r.usage.prompt_tokens == len(tok)
    ref_ids = engine_greedy(tok, 24)
    assert len(ref_ids) == r.usage.completion_tokens
    ref_text = httpx.post(server["url"] + "/detokenize", json={"tokens": ref_ids}).json()["prompt"]
    for special in ("<|im_end|>", "<|endoftext|>"):
        ref_text = ref_text.replace(special, "")
    assert text == ref_text
    # streaming gives the same text
    s = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(s)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # prefix cache hit


def test_completions_stream_and_not(client):
    r = client.completions.create(model=MODEL, prompt="The three primary colors are", max_tokens=12,
                                  temperature=0)
    s = client.completions.create(model=MODEL, prompt="The three primary colors are", max_tokens=12,
                                  temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("length", "stop")


def test_n_and_seeds(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Write a word."}], max_tokens=8,
              temperature=1.0, seed=42, n=3)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert len(a.choices) == 3
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]


def test_stop_strings(server, client):
    base = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=16,
                                     temperature=0).choices[0].text
    assert " 6" in base, base
    r = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=200,
                                  temperature=0, stop=[" 6"])
    assert r.choices[0].text == base[: base.find(" 6")]
    assert r.choices[0].finish_reason == "stop"
    assert wait_blocks_free(server, 3.0)  # the worker request was aborted, not run to 200
    s = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=200,
                                  temperature=0, stop=" 6", stream=True)
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text


def test_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)
    assert b"".join(bytes(e.bytes) for e in content).decode() == r.choices[0].message.content
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0, logprobs=1)
    assert len(c.choices[0].logprobs.tokens) == 3


def test_errors(server, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_LEN)
    assert str(MAX_LEN) in ei.value.body["message"]
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=CHAT, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert ei.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=CHAT, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})
    assert ei.value.body["param"] == "response_format"
    r = httpx.post(server["url"] + "/v1/chat/completions", content=b"{oops",
                   headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    anon = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anon.chat.completions.create(model=MODEL, messages=CHAT)


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        n = 0
        for line in r.iter_lines():
            n += line.startswith("data:")
            if n >= 4:
                break
        assert worker_stats(server).num_running == 1
    assert wait_blocks_free(server, 5.0)
