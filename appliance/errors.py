"""Domain errors: each carries an HTTP-like status and a message meant for people.

They are translated once at each edge (the HTTP exception handlers in `web/`, the CLI exit code).
"""


class ApplianceError(Exception):
    status = 500
    audited = False  # a use case already wrote this refusal's audit record: the edge adds no generic one

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ApplianceError):
    status = 400


class Unauthorized(ApplianceError):
    status = 401


class Forbidden(ApplianceError):
    status = 403


class NotFound(ApplianceError):
    status = 404


class Withheld(NotFound):
    """Something exists that the caller may not see: answered exactly like a missing thing (404), and
    recorded in the audit log as a refused access."""


class Conflict(ApplianceError):
    status = 409


class PayloadTooLarge(ApplianceError):
    status = 413


class TooManyRequests(ApplianceError):
    """The caller is over its rate limit; `retry_after` says in how many seconds it may try again."""

    status = 429

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class Busy(ApplianceError):
    """The server is at its queue bound; the client should retry in `retry_after` seconds."""

    status = 503

    def __init__(self, message: str, retry_after: int = 5):
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class InsufficientMemory(ApplianceError):
    status = 500


class RunnerFailed(ApplianceError):
    """The model runner process failed (crashed, could not load, died mid-request)."""

    status = 500
