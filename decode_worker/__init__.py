"""Decode worker: a gRPC `Worker` service around an engine that generates tokens.

In the aggregated mode it prefills locally; with a KV handle (issue 4) it pulls the
prompt's KV blocks from a prefill worker. Run it with `splitserve worker --role decode`.
"""
