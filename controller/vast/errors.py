"""Turn a Vast.ai HTTP answer into one of flux-remote's errors, in one place.

    ProviderError                    (controller.errors)
    ├── CredentialsError             401, or 404 with error=auth_error
    ├── OfferGoneError               404/410 with no_such_ask: try the next offer
    ├── QuotaError                   search_quota_exceeded: a daily quota, never retried
    ├── TransientError               429, 5xx, timeouts, dropped connections: retry with backoff
    └── InstanceNotReadyError        an instance failed or missed a deadline (carries instance_id)

Messages are built from the response body, never from the request, so the account key (sent
only in a header) cannot leak into them; they are still passed through ``redact`` by the client.
"""

from __future__ import annotations

from typing import Any, Callable

from controller.errors import (
    CredentialsError,
    FluxRemoteError,
    OfferGoneError,
    ProviderError,
    QuotaError,
)

KEY_HINT = (
    "set VAST_API_KEY, or save the key from https://cloud.vast.ai/account/ in "
    "~/.config/vastai/vast_api_key (the vastai CLI's `vastai set api-key` does that)"
)


class TransientError(ProviderError):
    """A failure worth retrying (rate limit, server error, network). ``sent`` is True when the
    request may have reached the server (so a non-idempotent call must be checked, not repeated)."""

    def __init__(self, message: str, *, status: int | None = None, sent: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.sent = sent


class InstanceNotReadyError(ProviderError):
    """The instance will not become usable: it failed, vanished or missed a phase deadline.

    The caller destroys it (``instance_id``) and tries the next offer.
    """

    def __init__(self, message: str, *, instance_id: int, reason: str,
                 instance: dict[str, Any] | None = None) -> None:
        super().__init__(message, hint="destroy it and try the next offer")
        self.instance_id = instance_id
        self.reason = reason
        self.instance = instance


def _body_text(body: Any) -> str:
    if isinstance(body, dict):
        parts = [str(body[k]) for k in ("error", "msg", "detail") if body.get(k)]
        return ": ".join(parts) if parts else str(body)
    return str(body or "").strip()[:300]


def error_for(status: int, body: Any, *, what: str,
              scrub: Callable[[str], str] = lambda text: text) -> FluxRemoteError | None:
    """The error an HTTP answer means, or None when it is a success.

    ``body`` is the decoded JSON (dict/list) or the raw text; ``what`` names the call
    ("create instance on offer 123") for the message; ``scrub`` removes secrets from the
    server's text before it goes into a message.
    """
    err_code = body.get("error") if isinstance(body, dict) else None
    text = scrub(_body_text(body))
    lowered = text.lower()
    if status == 401 or err_code == "auth_error":
        return CredentialsError(f"Vast.ai rejected the API key ({what}: {text})", hint=KEY_HINT)
    if err_code == "search_quota_exceeded" or "search_quota_exceeded" in lowered:
        return QuotaError(
            f"Vast.ai search quota exceeded ({what}); it resets daily",
            hint="plan against a saved search with --offers FILE.json, or wait for the reset",
        )
    if status in (404, 410) and "no_such_ask" in f"{err_code} {lowered}":
        return OfferGoneError(f"offer no longer available ({what}: {text})")
    if status == 429:
        return TransientError(f"Vast.ai rate limit ({what}: {text})", status=status)
    if status >= 500:
        return TransientError(f"Vast.ai server error {status} ({what}: {text})", status=status)
    if status >= 400:
        return ProviderError(f"Vast.ai answered {status} to {what}: {text}")
    if isinstance(body, dict) and body.get("success") is False:
        return ProviderError(f"Vast.ai refused {what}: {text}")
    return None
