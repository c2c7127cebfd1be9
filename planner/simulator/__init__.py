"""Trace-driven simulation of the prefill and decode pools with a sizing policy in the loop.

- `traces`: synthetic (steady, diurnal, bursty) and JSONL traces;
- `cluster`: the pools (exact prefill queues, fluid decode batching; co-located prefill
  replicas that share a host with a decode replica, fluid per step);
- `run`: the loop, `SimConfig`, the planner and static policies;
- `report`: planner vs. static-at-peak vs. static-at-mean, JSON report and plot.
"""
