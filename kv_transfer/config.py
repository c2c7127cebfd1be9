"""Configuration of a KV transport (one per worker), validated with explicit errors."""

from __future__ import annotations

from dataclasses import dataclass

#: `--kv-transport` choices.
TRANSPORT_KINDS = ("auto", "nixl", "grpc")


@dataclass(frozen=True)
class KvTransferConfig:
    """Tuning of a KV transport; the transport kind itself is an argument of create_transport."""

    #: Default timeout of one pull, seconds (pull(timeout_s=None) uses it).
    timeout_s: float = 30.0
    #: Shortest wait between completion checks of a NIXL pull, seconds. The checks run on the
    #: transport's own thread; a check costs microseconds.
    poll_min_s: float = 0.00002
    #: Longest wait between completion checks of a pull, seconds (the wait grows with the
    #: pull's elapsed time, 10 %, up to this cap).
    poll_max_s: float = 0.005
    #: Wait between two looks for notifications right after one arrived, seconds (serve side).
    notify_poll_min_s: float = 0.001
    #: Longest wait between two looks for notifications when idle, seconds (serve side), for
    #: a consumer that does not say when it expects pulls (notifications() without
    #: `expecting`).
    notify_poll_max_s: float = 0.01
    #: The same while `expecting()` says no blocks are pinned, seconds: nothing is pulled
    #: then, and wake() (called as blocks get pinned) ends the wait at once. Each look is a
    #: wake-up of the event loop and of the transport thread, which on this VM cost a prefill
    #: worker ~5 % of its core at 100 looks a second, taken from its prefills.
    notify_poll_idle_s: float = 0.25
    #: Wait between two looks for notifications while pulls are expected (blocks pinned),
    #: seconds. Under UCX's peer error handling a READ posted after an earlier notice waits
    #: for the target's next progress call, so the serve side polls this often then.
    notify_poll_busy_s: float = 0.0005
    #: While pulls are expected, one job on the transport thread polls for up to this long
    #: (returning at the first notice), seconds: fewer thread hops than one job per look.
    notify_busy_window_s: float = 0.02
    #: gRPC fallback: address the block server binds (loopback by default; "0.0.0.0" on a cluster).
    host: str = "127.0.0.1"
    #: gRPC fallback: address peers dial; None: `host`.
    advertise_host: str | None = None
    #: gRPC fallback: most bytes of KV per streamed message (whole blocks; at least one block).
    grpc_chunk_bytes: int = 4 << 20
    #: NIXL backends to instantiate (UCX moves DRAM and VRAM).
    nixl_backends: tuple[str, ...] = ("UCX",)
    #: Start NIXL's progress thread. Off by default: in nixl 1.5 it busy-polls a whole core
    #: (pthrDelay=0), and the pull/notification polling drives progress anyway.
    nixl_progress_thread: bool = False

    def __post_init__(self) -> None:
        for field_name in ("timeout_s", "poll_min_s", "poll_max_s", "notify_poll_min_s", "notify_poll_max_s",
                           "notify_poll_busy_s", "notify_busy_window_s", "notify_poll_idle_s"):
            value = getattr(self, field_name)
            if not value > 0:
                raise ValueError(f"KvTransferConfig.{field_name} must be > 0, got {value!r}")
        if self.poll_max_s < self.poll_min_s:
            raise ValueError(
                f"KvTransferConfig.poll_max_s ({self.poll_max_s}) < poll_min_s ({self.poll_min_s})"
            )
        if self.notify_poll_max_s < self.notify_poll_min_s:
            raise ValueError(
                f"KvTransferConfig.notify_poll_max_s ({self.notify_poll_max_s}) < "
                f"notify_poll_min_s ({self.notify_poll_min_s})"
            )
        if self.grpc_chunk_bytes <= 0:
            raise ValueError(f"KvTransferConfig.grpc_chunk_bytes must be > 0, got {self.grpc_chunk_bytes}")
        if not self.host:
            raise ValueError("KvTransferConfig.host must not be empty")
        if not self.nixl_backends:
            raise ValueError("KvTransferConfig.nixl_backends must name at least one backend")


def validate_kind(kind: str) -> str:
    """`kind` lower-cased, or ValueError naming the choices."""
    k = str(kind).lower()
    if k not in TRANSPORT_KINDS:
        raise ValueError(f"unknown KV transport {kind!r}; choose one of {', '.join(TRANSPORT_KINDS)}")
    return k
