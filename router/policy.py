"""The cost model and the choice among eligible workers: pure functions, no I/O, no state.

kv mode, per worker:
    prefill pool / aggregated:  cost = overlap_weight * prefill_blocks + active_blocks + new_blocks
        prefill_blocks = (prompt tokens not cached there + prefill tokens queued there) / block_size
        new_blocks = full prompt blocks not cached there: the KV the request would add to
        the worker's active blocks (as Dynamo's "potential active blocks"), so a worker
        already running requests on the same prefix is not charged for it twice
    decode pool (remote prefill): cost = active_blocks + decode_overlap_weight * blocks_to_pull
The lowest cost wins, ties go to the larger overlap, then to the worker whose prefix cache
holds fewer blocks (so distinct prefixes spread over workers instead of evicting each
other on one), remaining ties rotate. With temperature
T > 0 the worker is sampled with probability ∝ exp(-normalized_cost / T), costs normalized
to [0, 1] across the candidates. So on the prefill pool the overlap dominates (it is what
saves compute), on the decode pool the load dominates and the overlap breaks ties (the
worker that already holds the prefix needs fewer blocks moved).

Candidates come as parallel lists (overlap blocks, prefill tokens in flight, active blocks),
one entry per eligible worker: the router calls this for every request.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Sequence

from splitserve.router.config import RouterConfig


class Role(str, enum.Enum):
    """What the chosen worker will do with the request."""

    #: Prefill pool: compute the prompt's KV and the first token (remote prefill).
    PREFILL = "prefill"
    #: Decode pool, KV pulled from a prefill worker.
    DECODE = "decode"
    #: Decode pool, prompt prefilled locally (aggregated serving, or local prefill).
    AGGREGATED = "aggregated"


def kv_costs(
    role: Role,
    num_tokens: int,
    num_blocks: int,
    overlaps: Sequence[int],
    prefill_tokens: Sequence[int],
    active_blocks: Sequence[int],
    config: RouterConfig,
) -> list[float]:
    """kv-mode cost of each candidate for a prompt of `num_tokens` (`num_blocks` full)."""
    if role is Role.DECODE:
        w = config.decode_overlap_weight
        return [a + w * (num_blocks - o) for o, a in zip(overlaps, active_blocks)]
    w = config.overlap_weight / config.block_size
    bs = config.block_size
    return [
        w * (num_tokens - o * bs + p) + a + (num_blocks - o)
        for o, p, a in zip(overlaps, prefill_tokens, active_blocks)
    ]


def load_costs(
    prefill_tokens: Sequence[int], active_blocks: Sequence[int], config: RouterConfig
) -> list[float]:
    """Load alone (least-loaded mode): active blocks plus queued prefill, in blocks."""
    bs = config.block_size
    return [a + p / bs for p, a in zip(prefill_tokens, active_blocks)]


def softmax_sample(costs: Sequence[float], temperature: float, rng: random.Random) -> int:
    """Index sampled with p ∝ exp(-normalized cost / temperature); lower cost, likelier."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    lo = min(costs)
    span = max(costs) - lo
    if span <= 0:
        return rng.randrange(len(costs))
    weights = [math.exp(-((c - lo) / span) / temperature) for c in costs]
    r = rng.random() * sum(weights)
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if r < acc:
            return i
    return len(weights) - 1


def argmin_rotating(
    costs: Sequence[float],
    tiebreak: Sequence[int] | None,
    turn: int,
    fewest: Sequence[int] | None = None,
) -> int:
    """Index of the lowest cost; among equal costs the largest `tiebreak`, then the
    smallest `fewest`; among full ties the `turn`-th (mod their count), so equal workers
    share the load."""
    best = min(costs)
    ties = [i for i, c in enumerate(costs) if c == best]
    if tiebreak is not None and len(ties) > 1:
        top = max(tiebreak[i] for i in ties)
        ties = [i for i in ties if tiebreak[i] == top]
    if fewest is not None and len(ties) > 1:
        low = min(fewest[i] for i in ties)
        ties = [i for i in ties if fewest[i] == low]
    return ties[turn % len(ties)]


def choose(
    role: Role,
    overlaps: Sequence[int],
    prefill_tokens: Sequence[int],
    active_blocks: Sequence[int],
    num_tokens: int,
    num_blocks: int,
    config: RouterConfig,
    rng: random.Random,
    turn: int,
    cached_blocks: Sequence[int] | None = None,
) -> tuple[int, float]:
    """(index of the chosen candidate, its cost) under `config.mode`. `turn` is a counter
    the caller advances per choice (round-robin position, tie rotation); `cached_blocks`
    (blocks in each candidate's prefix cache, optional) breaks kv-mode ties."""
    n = len(overlaps)
    if n == 0:
        raise ValueError("choose() needs at least one candidate")
    mode = config.mode
    if mode == "least-loaded":
        costs = load_costs(prefill_tokens, active_blocks, config)
        i = argmin_rotating(costs, None, turn)
        return i, costs[i]
    costs = kv_costs(role, num_tokens, num_blocks, overlaps, prefill_tokens, active_blocks, config)
    if mode == "round-robin":
        i = turn % n
    elif mode == "random":
        i = rng.randrange(n)
    elif config.temperature > 0:
        i = softmax_sample(costs, config.temperature, rng)
    else:
        i = argmin_rotating(costs, overlaps, turn, cached_blocks)
    return i, costs[i]
