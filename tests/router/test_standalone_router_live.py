"""`splitserve router` standalone, end to end: two decode workers (SmolLM2, bf16, one thread
each), one `splitserve router` and TWO `splitserve frontend --router-address` processes, all
meeting in a private embedded:// discovery on loopback; driven with the official `openai`
client.

The two 256-token prefixes of test_routing_live are sent, one request at a time,
alternately through the two frontends. Each prefix's follow-ups land on the worker that
served it first whichever frontend received them (each frontend's `splitserve_router_routed_requests_total{worker}`
says where its requests went) and hit that worker's prefix cache; the router's Stats count
the requests of both frontends in its one load view, all released at the end.
"""

from __future__ import annotations

import os
import time
import uuid

import grpc
import httpx
import openai
import pytest

from splitserve.proto import router_pb2, router_pb2_grpc
from splitserve.runtime.process import ProcessGroup, splitserve_argv
from tests.helpers.serve import health, skip_without_model
from tests.router.test_routing_live import PREFIX_LEN, prompts, routed

pytestmark = pytest.mark.live

ENGINE = ["--dtype", "auto", "--num-threads", "1", "--kv-cache-memory", "64MiB",
          "--max-model-len", "1024"]
#: (prefix, frontend) of each request, in order: every prefix comes through both frontends.
SEQUENCE = [("A", 0), ("A", 1), ("B", 1), ("B", 0), ("A", 1), ("B", 0)]


def router_stats(address: str):
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as ch:
        return router_pb2_grpc.RouterStub(ch).Stats(router_pb2.RouterStatsRequest(), timeout=5)


def wait_until(cond, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout:.0f}s")
        time.sleep(0.1)


def test_repeated_prefix_lands_on_its_worker_through_either_frontend():
    skip_without_model()
    disc = f"embedded://test-router-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = ["--log-level", "WARNING"]
    group = ProcessGroup()
    try:
        for i in range(2):
            group.spawn(f"decode-{i}", splitserve_argv(
                *log, "worker", "--role", "decode", "--port", "0", "--worker-id", f"decode-{i}",
                "--discovery", disc, *ENGINE), env=env)
        router = group.spawn("router", splitserve_argv(
            *log, "router", "--port", "0", "--discovery", disc, "--stats-interval", "0.2"),
            env=env)
        address = router.wait_ready(30)["address"]
        frontends = [group.spawn(f"frontend-{i}", splitserve_argv(
            *log, "frontend", "--port", "0", "--discovery", disc, "--router-address", address,
            "--stats-interval", "0.2"), env=env) for i in range(2)]
        group.wait_all_ready(240)
        bases = [f["url"] for f in (fe.ready_event for fe in frontends)]
        for base in bases:
            wait_until(lambda b=base: health(b)[1].get("workers", {}).get("decode") == 2,
                       f"{base} sees 2 workers")
        wait_until(lambda: sum(w.state == "events" for w in router_stats(address).workers) == 2,
                   "the router follows both workers' KV events")

        clients = [openai.OpenAI(base_url=b + "/v1", api_key="none", max_retries=0,
                                 http_client=httpx.Client(trust_env=False, timeout=120))
                   for b in bases]
        ps = prompts()
        results = []
        with httpx.Client(timeout=30, trust_env=False) as http:
            for turn, (name, fe) in enumerate(SEQUENCE):
                before = routed(bases[fe], http)
                r = clients[fe].completions.create(
                    model="smollm2-135m", prompt=ps[name] + [400 + turn, 401, 402],
                    max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
                after = routed(bases[fe], http)
                (worker,) = [w for w, n in after.items() if n != before.get(w, 0)]
                results.append((name, fe, worker, r.usage.prompt_tokens_details.cached_tokens))
                time.sleep(0.1)  # let the worker's KV events reach the router

        home: dict[str, str] = {}
        for name, fe, worker, cached in results:
            if name in home:
                assert worker == home[name], results     # follows its prefix, either frontend
                assert cached >= PREFIX_LEN, results      # and hits its cache
            else:
                home[name] = worker
                assert cached < PREFIX_LEN, results
        assert home["A"] != home["B"], results            # load spread over both workers
        # One load view: the router booked the requests of both frontends and released all.
        stats = wait_until(lambda: (s := router_stats(address)).tracked_requests == 0 and s,
                           "every request released")
        assert stats.requests == len(SEQUENCE)
        assert sorted(dict(stats.clients).values()) == [3, 3], stats.clients
        assert stats.prefix_hit_rate >= 0.6, stats
    finally:
        group.stop_all()
    # SIGTERM ends the router (and the workers) cleanly. (A frontend ends with -15: uvicorn
    # re-raises the signal it caught once it has shut down.)
    codes = {c.name: c.proc.returncode for c in group.children}
    assert codes["router"] == 0 and codes["decode-0"] == codes["decode-1"] == 0, codes
