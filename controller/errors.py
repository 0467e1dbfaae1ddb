"""The errors a user of flux-remote can see.

    FluxRemoteError              root; ``str(exc)`` is the message a person reads
    ├── SpecError                bad run.yaml / batch file / dataset path (exit 2)
    ├── BudgetError              refused because the estimate does not fit the budget (exit 3)
    ├── ProviderError            the cloud said no (Vast API, instance never became ready)
    │   ├── CredentialsError     no key, or a key the provider rejects
    │   ├── OfferGoneError       the offer was rented by someone else: try the next one
    │   └── QuotaError           a quota that must not be retried (search_quota_exceeded)
    ├── TransportError           SSH / rsync failed (host key changed, unreachable, ...)
    │   └── HostKeyError         the host key differs from the pinned one
    └── RunError                 a run failed (agent stage failed, fetch could not be verified)

Foreign exceptions are translated once, at the boundary (``raise X(...) from exc``). The CLI
catches only these; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_RUN_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_BUDGET = 3


class FluxRemoteError(Exception):
    """Root of every error flux-remote raises on purpose."""

    exit_code: int = EXIT_RUN_FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class SpecError(FluxRemoteError):
    """Bad input: carries every problem found, each already located (file:line:col: field: what)."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: list[str] | str, *, hint: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems), hint=hint)


class BudgetError(FluxRemoteError):
    """The estimate (or the batch ledger) does not fit the budget: nothing was rented."""

    exit_code = EXIT_BUDGET


class ProviderError(FluxRemoteError):
    """The provider refused or failed: an API error, or an instance that never became ready."""


class CredentialsError(ProviderError):
    """No key, or a key the provider rejects; the message says how to set one."""

    exit_code = EXIT_BAD_INPUT


class OfferGoneError(ProviderError):
    """The offer was rented by someone else between search and create: try the next."""


class QuotaError(ProviderError):
    """A quota that must not be retried (Vast's daily ``search_quota_exceeded``)."""


class TransportError(FluxRemoteError):
    """SSH or rsync failed: unreachable host, dropped connection, failed transfer."""


class HostKeyError(TransportError):
    """The host key differs from the pinned one: refused, nothing is sent."""


class RunError(FluxRemoteError):
    """A run failed: an agent stage failed, or the fetched bundle did not verify."""
