"""The simulated pools: prefill replicas as exact queues, decode replicas as a fluid batch.

Prefill (exact, per request). The router sends each prompt to the replica that frees up
first (least queued work) and it waits there in FIFO order; replicas serve one prompt at a
time. A prompt occupies its replica for `isl / prefill_tok_s(isl)` and gets its first
token `max(prefill_ttft(isl), occupancy)` after it starts. A heap of (free-at, ready-at,
id) makes this O(log P) per request. New replicas join the heap free at the end of their
start-up delay (queued prompts stay where they were routed). A removed replica takes no
new prompts, finishes its queue, and is billed until then.

Decode (fluid in time, exact per request admission). Time advances in steps of `dt`;
a request joins the decode replica with the fewest running requests (least KV as the
tie-break) that has a free batch slot and room for `isl + osl` KV tokens (reserved whole at
admission: no preemption is modelled); otherwise it waits in a FIFO queue. Within a step
every running request on replica r advances `dt / itl_r` tokens, with
`itl_r = decode_itl(batch_r, mean context_r)` from the profile, so one step covers many
tokens; finish times are interpolated inside the step. A removed replica drains: it takes
no new requests and is billed until its last one finishes.
"""

from __future__ import annotations

import heapq
import math
from collections import deque

import numpy as np

from splitserve.planner.profile import Profile


class PrefillPool:
    """FIFO prefill queues with least-work routing; see the module docstring."""

    def __init__(self) -> None:
        #: (free_at, ready_at, replica id)
        self.heap: list[tuple[float, float, int]] = []
        self._next_id = 0
        #: GPU-replica-seconds billed beyond a removal (busy replicas finishing their queue).
        self.extra_replica_s = 0.0
        #: Requests that arrived while the pool was empty (index, arrival).
        self.backlog: deque[int] = deque()

    @property
    def size(self) -> int:
        return len(self.heap)

    def resize(self, n: int, now: float, ready_at: float, bill_until: float) -> None:
        """Grow to `n` (new replicas ready at `ready_at`) or shrink to `n` at time `now`."""
        while len(self.heap) < n:
            heapq.heappush(self.heap, (ready_at, ready_at, self._next_id))
            self._next_id += 1
        while len(self.heap) > n:
            free, ready, _ = heapq.heappop(self.heap)
            if free > ready and free > now:  # busy: finishes its queue, billed meanwhile
                self.extra_replica_s += max(0.0, min(free, bill_until) - now)

    def serve(
        self,
        idx: range,
        arrival: list[float],
        occupancy: list[float],
        latency: list[float],
        first_token: np.ndarray,
    ) -> None:
        """Route requests `idx` (in arrival order); writes their first-token times."""
        heap = self.heap
        backlog = self.backlog
        if not heap:
            backlog.extend(idx)
            return
        replace = heapq.heapreplace
        if backlog:
            pending: list[int] | range = list(backlog) + list(idx)
            backlog.clear()
        else:
            pending = idx
        for k in pending:
            a = arrival[k]
            top = heap[0]
            start = a if a > top[0] else top[0]
            replace(heap, (start + occupancy[k], top[1], top[2]))
            first_token[k] = start + latency[k]


class DecodePool:
    """Continuous-batching decode replicas, fluid within a step; see the module docstring."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.kv_cap = float(profile.kv_capacity_tokens)
        self.max_batch = profile.max_decode_batch
        cap = 16
        self.alive = np.zeros(cap, dtype=bool)
        self.draining = np.zeros(cap, dtype=bool)
        self.ready_at = np.zeros(cap)
        self.kv_used = np.zeros(cap)
        self.nrun = np.zeros(cap, dtype=np.int64)
        # running requests (structure of arrays)
        self.r_req = np.zeros(0, dtype=np.int64)
        self.r_rep = np.zeros(0, dtype=np.int64)
        self.r_rem = np.zeros(0)
        self.r_ctx = np.zeros(0)
        self.r_join = np.zeros(0)
        self.r_need = np.zeros(0)
        #: requests waiting for a slot: (index, time it became ready to decode)
        self.waiting: deque[tuple[int, float]] = deque()

    # ------------------------------------------------------------------ replicas
    @property
    def size(self) -> int:
        """Replicas that take new requests or will (starting ones included)."""
        return int(np.count_nonzero(self.alive & ~self.draining))

    @property
    def billed(self) -> int:
        """Replicas that hold a GPU (starting, serving or draining)."""
        return int(np.count_nonzero(self.alive))

    def _grow(self) -> None:
        cap = self.alive.size * 2
        for name in ("alive", "draining", "ready_at", "kv_used", "nrun"):
            old = getattr(self, name)
            new = np.zeros(cap, dtype=old.dtype)
            new[: old.size] = old
            setattr(self, name, new)

    def resize(self, n: int, now: float, ready_at: float) -> None:
        """Grow to `n` admitting replicas (un-draining first) or drain down to `n`."""
        cur = self.size
        if n > cur:
            need = n - cur
            # Cancel drains first: those replicas are ready at once.
            drain = np.flatnonzero(self.alive & self.draining)
            take = drain[:need]
            self.draining[take] = False
            need -= take.size
            while need > 0:
                free = np.flatnonzero(~self.alive)
                if free.size == 0:
                    self._grow()
                    continue
                slots = free[:need]
                self.alive[slots] = True
                self.draining[slots] = False
                self.ready_at[slots] = ready_at
                self.kv_used[slots] = 0.0
                self.nrun[slots] = 0
                need -= slots.size
        elif n < cur:
            cand = np.flatnonzero(self.alive & ~self.draining)
            # Not-yet-ready replicas go first (nothing runs on them), then the least busy.
            key = np.where(self.ready_at[cand] > now, -1, self.nrun[cand])
            victims = cand[np.argsort(key, kind="stable")[: cur - n]]
            self.draining[victims] = True
            self._retire_idle()

    def _retire_idle(self) -> None:
        done = self.alive & self.draining & (self.nrun == 0)
        self.alive[done] = False
        self.draining[done] = False

    # ------------------------------------------------------------------ admission
    def admit(
        self, new_idx: np.ndarray, new_time: np.ndarray, now: float, need: np.ndarray, rem: np.ndarray,
        ctx0: np.ndarray,
    ) -> float:
        """Place waiting then new requests (arrival-ordered); returns the wait time they accrued."""
        ok = self.alive & ~self.draining & (self.ready_at <= now)
        queue = self.waiting
        for k, t in zip(new_idx.tolist(), new_time.tolist()):
            queue.append((k, t))
        if not queue:
            return 0.0
        cand = np.flatnonzero(ok)
        if cand.size == 0:
            return 0.0
        nrun, kv = self.nrun, self.kv_used
        heap = list(zip(nrun[cand].tolist(), kv[cand].tolist(), cand.tolist()))
        heapq.heapify(heap)
        kv_cap, max_b = self.kv_cap, self.max_batch
        reqs: list[int] = []
        reps: list[int] = []
        joins: list[float] = []
        waited = 0.0
        while queue and heap:
            k, t = queue[0]
            nk = float(need[k])
            rejected = []
            placed = -1
            while heap:
                c, u, r = heapq.heappop(heap)
                if c < max_b and u + nk <= kv_cap:
                    placed = r
                    heapq.heappush(heap, (c + 1, u + nk, r))
                    break
                if c < max_b and u == 0.0:
                    # an empty replica that still cannot hold it: it never fits anywhere
                    placed = -2
                    heapq.heappush(heap, (c, u, r))
                    break
                rejected.append((c, u, r))
            for item in rejected:
                heapq.heappush(heap, item)
            if placed == -1:
                break  # everything is full: FIFO, later requests wait too
            queue.popleft()
            if placed == -2:
                continue  # dropped: longer than a whole replica's KV cache
            join = t if t > now else now
            waited += join - t
            reqs.append(k)
            reps.append(placed)
            joins.append(join)
        if reqs:
            ri = np.asarray(reqs, dtype=np.int64)
            rp = np.asarray(reps, dtype=np.int64)
            nk = need[ri].astype(np.float64)
            np.add.at(self.nrun, rp, 1)
            np.add.at(self.kv_used, rp, nk)
            self.r_req = np.concatenate([self.r_req, ri])
            self.r_rep = np.concatenate([self.r_rep, rp])
            self.r_rem = np.concatenate([self.r_rem, rem[ri].astype(np.float64)])
            self.r_ctx = np.concatenate([self.r_ctx, ctx0[ri].astype(np.float64)])
            self.r_join = np.concatenate([self.r_join, np.asarray(joins)])
            self.r_need = np.concatenate([self.r_need, nk])
        return waited

    # ------------------------------------------------------------------ one step
    def step(
        self, t0: float, dt: float, finish: np.ndarray, slowdown: np.ndarray | None = None
    ) -> tuple[float, float, np.ndarray]:
        """Advance [t0, t0+dt); writes finish times. Returns (request-seconds, tokens, done idx).

        `slowdown[r]` (>= 1, optional) multiplies replica r's ITL in this step (co-location)."""
        t1 = t0 + dt
        if self.r_req.size == 0:
            self._retire_idle()
            return 0.0, 0.0, np.zeros(0, dtype=np.int64)
        rep = self.r_rep
        n = self.alive.size
        counts = np.bincount(rep, minlength=n)
        ctx_sum = np.bincount(rep, weights=self.r_ctx, minlength=n)
        busy = np.flatnonzero(counts)
        itl = np.full(n, math.inf)
        itl_ms = np.asarray(self.profile.decode_itl_ms(counts[busy], ctx_sum[busy] / counts[busy]), dtype=np.float64)
        # Admission keeps batch x context within capacity; inf only from float edge cases.
        itl_ms = np.where(np.isfinite(itl_ms), itl_ms, np.nanmax(np.where(np.isfinite(itl_ms), itl_ms, 0.0)) * 4 + 1e3)
        itl[busy] = itl_ms / 1000.0
        if slowdown is not None:
            m = min(slowdown.size, n)
            itl[:m] *= slowdown[:m]
        start = np.maximum(self.r_join, t0)
        span = t1 - start
        my_itl = itl[rep]
        tokens = span / my_itl
        rem = self.r_rem
        done = tokens >= rem
        gen = np.where(done, rem, tokens)
        busy_s = float(np.sum(np.where(done, rem * my_itl, span)))
        total_tokens = float(np.sum(gen))
        done_idx = np.flatnonzero(done)
        if done_idx.size:
            reqs = self.r_req[done_idx]
            finish[reqs] = start[done_idx] + rem[done_idx] * my_itl[done_idx]
            drep = rep[done_idx]
            np.subtract.at(self.nrun, drep, 1)
            np.subtract.at(self.kv_used, drep, self.r_need[done_idx])
            keep = ~done
            self.r_req = self.r_req[keep]
            self.r_rep = rep[keep]
            self.r_rem = (rem - gen)[keep]
            self.r_ctx = (self.r_ctx + gen)[keep]
            self.r_join = self.r_join[keep]
            self.r_need = self.r_need[keep]
            self._retire_idle()
        else:
            reqs = np.zeros(0, dtype=np.int64)
            self.r_rem = rem - gen
            self.r_ctx = self.r_ctx + gen
        return busy_s, total_tokens, reqs


class ColocatedPrefillPool:
    """Prefill replicas that share their host with a decode replica (co-location mode).

    Replica i shares cores with decode replica i. Each replica runs engine steps: a step
    takes the arrived prompts at the head of its FIFO queue up to `max_batched_tokens`
    prompt tokens (the engine's token budget; the last prompt may be chunked and finish in a
    later step; None: one whole prompt per step), and every prompt that completes in the
    step gets its first token at the step's end. A prompt's tokens cost `occupancy / isl`
    seconds each on an uncontended replica; during a decode step in which the decode
    neighbour has running requests the replica runs at 1 / prefill_slowdown of that speed.
    Routing: least remaining work. `busy_fraction` (per replica, of the last step) lets the
    decode neighbour apply decode_slowdown for that share of its step. Fixed size: the pools
    do not resize in this mode.
    """

    def __init__(self, n: int, max_batched_tokens: int | None = None) -> None:
        #: per replica: FIFO of [request, arrival, tokens left, seconds per token]
        self.queues: list[deque[list]] = [deque() for _ in range(n)]
        #: per replica: the running step as [uncontended seconds left, requests it completes], or None
        self.current: list[list | None] = [None] * n
        self.work = np.zeros(n)
        self.busy_fraction = np.zeros(n)
        self.max_batched_tokens = max_batched_tokens

    @property
    def size(self) -> int:
        return len(self.queues)

    def idle(self) -> bool:
        return not any(self.queues) and all(c is None for c in self.current)

    def route(self, idx: np.ndarray, arrival: np.ndarray, isl: np.ndarray, occupancy: np.ndarray) -> None:
        if not self.queues:
            return  # no prefill replica: these requests never start
        for k in idx.tolist():
            r = int(np.argmin(self.work))
            n = float(isl[k])
            self.queues[r].append([k, float(arrival[k]), n, float(occupancy[k]) / n])
            self.work[r] += float(occupancy[k])

    def _form_step(self, q: deque, now: float) -> list | None:
        """The next engine step from the arrived head of `q` (None if nothing has arrived)."""
        budget = self.max_batched_tokens
        work, completes = 0.0, []
        while q and q[0][1] <= now:
            item = q[0]
            take = item[2] if budget is None else min(item[2], budget)
            work += take * item[3]
            item[2] -= take
            if item[2] <= 0:
                completes.append(item[0])
                q.popleft()
            if budget is None:
                break
            budget -= take
            if budget <= 0:
                break
        return [work, completes] if work > 0 or completes else None

    def step(self, u: float, dt: float, neighbour_busy: np.ndarray, slowdown: float, first_token: np.ndarray) -> list[int]:
        """Advance [u, u+dt); writes first-token times; returns the requests that finished."""
        done: list[int] = []
        end = u + dt
        for r, q in enumerate(self.queues):
            busy = 0.0
            slow = slowdown if r < neighbour_busy.size and neighbour_busy[r] else 1.0
            c = u
            while c < end:
                cur = self.current[r]
                if cur is None:
                    cur = self._form_step(q, c)
                    if cur is None:
                        if not q or q[0][1] >= end:
                            break
                        c = q[0][1]  # idle until the next prompt arrives
                        continue
                    self.current[r] = cur
                need = cur[0] * slow
                if c + need <= end:
                    c += need
                    busy += need
                    self.work[r] -= cur[0]
                    for k in cur[1]:
                        first_token[k] = c
                    done.extend(cur[1])
                    self.current[r] = None
                else:
                    ran = end - c
                    busy += ran
                    cur[0] -= ran / slow
                    self.work[r] -= ran / slow
                    c = end
            self.busy_fraction[r] = busy / dt
        return done
