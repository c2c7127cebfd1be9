"""Discovery backends by URL scheme, and `open_discovery(url)`.

The registry maps a scheme to "module:Class"; the module is imported only when a URL of
that scheme is opened, so `embedded://` users never import the etcd client. A backend
class provides `async open(url, **options) -> Discovery`.
"""

from __future__ import annotations

import importlib
import urllib.parse
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .types import Discovery, DiscoveryConfigError

#: scheme -> "module:Class" of its backend
BACKENDS: Mapping[str, str] = MappingProxyType(
    {
        "etcd": "splitserve.runtime.discovery.etcd:EtcdDiscovery",
        "embedded": "splitserve.runtime.discovery.embedded:EmbeddedDiscovery",
    }
)


def backend_class(url: str) -> type:
    """The backend class for `url`'s scheme (imports its module)."""
    scheme = urllib.parse.urlsplit(url).scheme
    target = BACKENDS.get(scheme)
    if target is None:
        raise DiscoveryConfigError(
            f"unknown discovery URL {url!r}: the scheme must be one of "
            + ", ".join(f"{s}://" for s in BACKENDS)
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("splitserve"):
            raise DiscoveryConfigError(
                f"{scheme}:// discovery needs the {exc.name!r} package (pip install {exc.name})"
            ) from exc
        raise
    return getattr(module, class_name)


async def open_discovery(url: str, **options: Any) -> Discovery:
    """Open the discovery backend named by `url`.

    - `etcd://HOST[:PORT][/NAMESPACE][?timeout=S]` (options: namespace, timeout_s, ...)
    - `embedded://NAME`, `embedded:///abs/dir`, or `embedded://` with `deployment=NAME`
      (options: deployment, base_dir, poll_interval_s)

    Must be called inside a running event loop; close the result with `await d.close()`.
    """
    return await backend_class(url).open(url, **options)
