"""The whole request path in one process, driven with the official `openai` client:
tiny random-weight engine -> real gRPC worker -> WorkerPool -> FastAPI on uvicorn (loopback).

Fast (no model download); the same behaviours against the real default model are in
test_openai_live.py.
"""

import asyncio
import json

import httpx
import openai
import pytest
import pytest_asyncio

from .fakes import inprocess_stack, wait_until

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_LEN = 256
MSG = [{"role": "user", "content": "hello"}]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack():
    async with inprocess_stack(max_model_len=MAX_LEN) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(stack):
    c = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
    yield c
    await c.close()


def all_blocks_free(stack):
    s = stack.worker_stats()
    return s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks


async def metric(stack, name: str) -> float:
    async with httpx.AsyncClient() as h:
        text = (await h.get(stack.url + "/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def test_models_and_health(stack, client):
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert (await client.models.retrieve("tiny")).id == "tiny"
    async with httpx.AsyncClient() as h:
        r = await h.get(stack.url + "/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "workers": {"decode": 1, "prefill": 0}}


async def test_chat_stream_equals_whole(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=20, temperature=0, ignore_eos=True)
    whole = await client.chat.completions.create(**{k: v for k, v in kw.items() if k != "ignore_eos"},
                                                 extra_body={"ignore_eos": True})
    ch = whole.choices[0]
    assert ch.finish_reason == "length" and whole.usage.completion_tokens == 20
    assert whole.object == "chat.completion" and ch.message.role == "assistant"
    stream = await client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ch.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


async def test_completions_prompt_forms_and_order(client):
    r = await client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=4,
                                        temperature=0, n=2, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: same prompt, same text
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 16
    single = await client.completions.create(model="tiny", prompt=[8, 9], max_tokens=4,
                                             temperature=0, extra_body={"ignore_eos": True})
    assert single.choices[0].text == r.choices[2].text
    s = await client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0,
                                        stream=True, extra_body={"ignore_eos": True})
    chunks = [c async for c in s]
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_seeds_reproducible_and_distinct_per_choice(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=12, temperature=1.0, seed=1234, n=3,
              extra_body={"ignore_eos": True})
    a = await client.chat.completions.create(**kw)
    b = await client.chat.completions.create(**kw)
    ta = [c.message.content for c in a.choices]
    assert ta == [c.message.content for c in b.choices]
    assert len(set(ta)) > 1  # distinct seeds per choice
    one = await client.chat.completions.create(**{**kw, "n": 1})
    assert one.choices[0].message.content == ta[0]


async def test_stop_string_cuts_output_and_frees_worker(stack, client):
    base = await client.completions.create(model="tiny", prompt="xyz", max_tokens=30,
                                           temperature=0, extra_body={"ignore_eos": True})
    text = base.choices[0].text
    stop = text[10:13]
    cut = text[: text.find(stop)]
    r = await client.completions.create(model="tiny", prompt="xyz", max_tokens=200, temperature=0,
                                        stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 200
    assert await wait_until(lambda: all_blocks_free(stack), 2.0)
    s = await client.completions.create(model="tiny", prompt="xyz", max_tokens=200, temperature=0,
                                        stop=stop, stream=True, extra_body={"ignore_eos": True})
    chunks = [c async for c in s]
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_logprobs_shapes(client):
    r = await client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5,
                                             temperature=0, logprobs=True, top_logprobs=3,
                                             extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob
        assert abs(e.top_logprobs[0].logprob - e.logprob) < 1e-4  # greedy picks the top one
    assert "".join(bytes(e.bytes).decode("utf-8", "replace") for e in content) == r.choices[0].message.content
    c = await client.completions.create(model="tiny", prompt="ab", max_tokens=4, temperature=0,
                                        logprobs=2, extra_body={"ignore_eos": True})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0 and all(len(t) <= 2 for t in lp.top_logprobs)


async def test_stream_disconnect_aborts_worker_request(stack):
    before = await metric(stack, 'splitserve_requests_total{status="aborted"}')
    body = {"model": "tiny", "messages": MSG, "max_tokens": 200, "stream": True,
            "ignore_eos": True, "temperature": 0}
    async with httpx.AsyncClient(timeout=10) as h:
        async with h.stream("POST", stack.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    n += 1
                if n >= 4:
                    break
    assert await wait_until(lambda: all_blocks_free(stack), 3.0)
    assert await wait_until_async(
        lambda: metric(stack, 'splitserve_requests_total{status="aborted"}'), before + 1)


async def test_non_stream_disconnect_aborts_worker_request(stack):
    before = await metric(stack, 'splitserve_requests_total{status="aborted"}')
    body = {"model": "tiny", "prompt": "a", "max_tokens": 250, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=httpx.Timeout(0.05)) as h:
        with pytest.raises(httpx.TimeoutException):
            await h.post(stack.url + "/v1/completions", json=body)
    assert await wait_until_async(
        lambda: metric(stack, 'splitserve_requests_total{status="aborted"}'), before + 1)
    assert await wait_until(lambda: all_blocks_free(stack), 3.0)


async def wait_until_async(get, at_least: float, timeout: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await get() >= at_least:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_metrics_exposed(stack, client):
    await client.chat.completions.create(model="tiny", messages=MSG, max_tokens=3)
    async with httpx.AsyncClient() as h:
        text = (await h.get(stack.url + "/metrics")).text
    for name in ("splitserve_time_to_first_token_seconds_bucket",
                 "splitserve_inter_token_latency_seconds_bucket",
                 "splitserve_e2e_latency_seconds_bucket", "splitserve_input_tokens_bucket",
                 "splitserve_output_tokens_bucket", 'splitserve_requests_total{status="success"}',
                 "splitserve_requests_in_flight", "splitserve_requests_queued",
                 'splitserve_kv_cache_usage{worker="decode-0"}'):
        assert name in text, name
    assert await metric(stack, 'splitserve_requests_total{status="success"}') >= 1


async def test_tokenize_detokenize(stack):
    async with httpx.AsyncClient() as h:
        t = (await h.post(stack.url + "/tokenize", json={"prompt": "hi!"})).json()
        assert t["tokens"] == list(b"hi!") and t["count"] == 3 and t["max_model_len"] == MAX_LEN
        d = (await h.post(stack.url + "/detokenize", json={"tokens": t["tokens"]})).json()
        assert d == {"prompt": "hi!"}
        chat = (await h.post(stack.url + "/tokenize", json={"messages": MSG})).json()
        assert bytes(chat["tokens"]).decode() == "<user>hello\n<assistant>"


# -- errors -----------------------------------------------------------------------------------
async def post(stack, path, body, **kw):
    async with httpx.AsyncClient() as h:
        if isinstance(body, (bytes, str)):
            return await h.post(stack.url + path, content=body,
                                headers={"content-type": "application/json", **kw.pop("headers", {})}, **kw)
        return await h.post(stack.url + path, json=body, **kw)


def assert_error(r, status, param=None, contains=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    if contains is not None:
        assert contains in err["message"], err


@pytest.mark.parametrize("body,param,contains", [
    (b"{not json", None, "Invalid JSON"),
    ({"model": "tiny"}, "messages", "messages"),
    ({"model": "tiny", "messages": MSG, "temperature": "hot"}, "temperature", None),
    ({"model": "tiny", "messages": MSG, "frobnicate": 1}, "frobnicate", "frobnicate"),
    ({"model": "tiny", "messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools", "tools"),
    ({"model": "tiny", "messages": MSG,
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
     "response_format", "response_format"),
    ({"model": "tiny", "messages": MSG, "max_tokens": MAX_LEN}, "max_tokens", str(MAX_LEN)),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * (MAX_LEN + 5)}]},
     "messages", f"maximum context length is {MAX_LEN}"),
    ({"model": "tiny", "messages": [{"role": "tool", "content": "x"}]}, "messages", None),
])
async def test_chat_request_errors_are_400(stack, body, param, contains):
    assert_error(await post(stack, "/v1/chat/completions", body), 400, param, contains)


async def test_completion_errors(stack):
    assert_error(await post(stack, "/v1/completions", {"model": "tiny", "prompt": [9999]}),
                 400, "prompt", "out of range")
    assert_error(await post(stack, "/v1/completions", {"model": "tiny", "prompt": "a", "echo": True}),
                 400, "echo")


async def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as ei:
        await client.chat.completions.create(model="gpt-4", messages=MSG)
    assert ei.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-4")


async def test_unknown_route_is_openai_shaped_404(stack):
    async with httpx.AsyncClient() as h:
        assert_error(await h.get(stack.url + "/v1/nothing"), 404)


async def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as ei:
        await client.chat.completions.create(model="tiny", messages=MSG, top_logprobs=2)
    assert ei.value.body["param"] == "top_logprobs"


async def test_api_key_required_on_v1_only():
    async with inprocess_stack(api_key="s3cret") as s:
        ok = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        bad = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        r = await ok.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        assert r.choices[0].finish_reason in ("length", "stop")
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="tiny", messages=MSG, max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
        async with httpx.AsyncClient() as h:
            r = await h.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSG})
            assert_error(r, 401)
            assert (await h.get(s.url + "/health")).status_code == 200
        await ok.close()
        await bad.close()


async def test_no_worker_is_503_with_retry_after():
    async with inprocess_stack(with_workers=False) as s:
        async with httpx.AsyncClient() as h:
            r = await h.get(s.url + "/health")
            assert r.status_code == 503 and r.json()["workers"] == {"decode": 0, "prefill": 0}
            r = await h.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": MSG})
            assert_error(r, 503)
            assert r.headers["retry-after"] == "1"
            r = await h.post(s.url + "/v1/chat/completions",
                             json={"model": "tiny", "messages": MSG, "stream": True})
            assert_error(r, 503)


async def test_dead_worker_retries_on_another():
    async with inprocess_stack(num_workers=2) as s:
        c = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        await s.hosts[0].stop(grace=0)
        for _ in range(4):  # some land on the dead worker first, then go to the live one
            r = await c.completions.create(model="tiny", prompt="a", max_tokens=2)
            assert r.choices[0].text is not None
        assert s.pool.counts()["decode"] == 1
        await c.close()


async def test_n_streaming_interleaves_all_choices(client):
    s = await client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, n=3,
                                             temperature=1.0, seed=5, stream=True,
                                             extra_body={"ignore_eos": True})
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    async for c in s:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert sorted(finish) == [0, 1, 2] and set(finish.values()) == {"length"}
    whole = await client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, n=3,
                                                 temperature=1.0, seed=5,
                                                 extra_body={"ignore_eos": True})
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole.choices]


async def test_sse_wire_format(stack):
    body = {"model": "tiny", "prompt": "q", "max_tokens": 2, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient() as h:
        r = await h.post(stack.url + "/v1/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"
