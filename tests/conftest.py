"""Session-wide fixtures shared by several test folders."""

from __future__ import annotations

import pytest

from splitserve.runtime.cli import quiet_grpc_fork_handlers

# The test process uses gRPC in-process and also spawns workers: see the function.
quiet_grpc_fork_handlers()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from splitserve.engine.model_loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m"))


@pytest.fixture(scope="session")
def parity_prompts(smollm2_tokenizer):
    from tests.helpers.parity import parity_prompts

    return parity_prompts(smollm2_tokenizer)


@pytest.fixture(scope="session")
def parity_reference(parity_prompts):
    """transformers' greedy tokens for the parity prompts (computed once per session)."""
    from tests.helpers.parity import transformers_reference

    return transformers_reference(parity_prompts)
