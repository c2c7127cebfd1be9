"""Prefill workers: run prompts, pin their KV blocks, hand them to decode workers."""
