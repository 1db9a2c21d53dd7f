"""The errors every Label Studio module raises (no imports: the pure modules use them too)."""

from __future__ import annotations


class LabelStudioError(RuntimeError):
    """A push or pull could not complete; the message says what to do. ``status`` is the HTTP
    status the server answered (None when it did not answer); ``body`` its answer, token redacted."""

    def __init__(self, message: str, status: int | None = None, body=None):
        super().__init__(message)
        self.status, self.body = status, body


class AuthError(LabelStudioError):
    """The server refused the API token (401/403)."""


class UnreachableError(LabelStudioError):
    """The server did not answer (connection refused, reset, timed out)."""


class TaskError(ValueError):
    """One row cannot become a valid task (the rest of the push goes on)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason
