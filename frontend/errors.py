"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

from __future__ import annotations

from typing import Any

#: HTTP status -> OpenAI error `type`.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class OpenAIError(Exception):
    """An error answered to the client as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None):
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def invalid(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def unsupported(field: str, detail: str = "") -> OpenAIError:
    """A request field we do not implement: refused, never silently ignored."""
    extra = f" ({detail})" if detail else ""
    return OpenAIError(
        400, f"'{field}' is not supported by this server{extra}", param=field, code="unsupported_parameter"
    )


class NoWorkerAvailable(OpenAIError):
    """No healthy worker of the needed role: 503 with Retry-After."""

    def __init__(self, role: str, retry_after_s: int = 1) -> None:
        super().__init__(
            503,
            f"no {role} worker is available to take the request; retry later",
            code="no_worker_available",
            headers={"Retry-After": str(retry_after_s)},
        )
        self.role = role
