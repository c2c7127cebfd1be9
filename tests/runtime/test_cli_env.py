"""The CLI's process-wide environment: gRPC fork support off unless the user set it."""

from __future__ import annotations

import os

from splitserve.runtime.cli import quiet_grpc_fork_handlers


def test_grpc_fork_support_off_by_default_and_user_setting_kept(monkeypatch):
    monkeypatch.delenv("GRPC_ENABLE_FORK_SUPPORT", raising=False)
    quiet_grpc_fork_handlers()
    assert os.environ["GRPC_ENABLE_FORK_SUPPORT"] == "false"
    monkeypatch.setenv("GRPC_ENABLE_FORK_SUPPORT", "true")
    quiet_grpc_fork_handlers()
    assert os.environ["GRPC_ENABLE_FORK_SUPPORT"] == "true"

