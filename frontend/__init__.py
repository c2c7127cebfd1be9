"""The OpenAI-compatible HTTP frontend: validation, chat templates, tokenization,
incremental detokenization, stop strings, SSE streaming and Prometheus metrics.

It holds no model weights: only the tokenizer and the model config. Workers speak token ids.
`create_app(FrontendConfig, WorkerPool)` builds the FastAPI app; `splitserve frontend` runs it.
"""
