"""Where a run's agent gets a machine: ``vast`` (rented), ``ssh`` (own host), ``local`` (here).

``get_provider(spec)`` picks the implementation named by ``spec.provider.type``; keyword
arguments go to its constructor (tests inject a Vast client, an SSH user and key, clocks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from controller.errors import SpecError
from controller.providers.base import Estimate, Machine, Provider

if TYPE_CHECKING:
    from controller.journal import Journal
    from controller.spec.model import RunSpec

__all__ = ["Estimate", "Machine", "Provider", "get_provider", "provider_named"]


def provider_named(name: str, *, journal: "Journal | None" = None, **kwargs: Any) -> Provider:
    """The provider called ``name``; a journal feeds measured s/step to the Vast planner."""
    if name == "vast":
        from controller.providers.vast import VastProvider

        if journal is not None and "measured_s_per_step" not in kwargs:
            kwargs["measured_s_per_step"] = journal.measured_s_per_step()
        return VastProvider(**kwargs)
    if name == "ssh":
        from controller.providers.ssh import SshProvider

        return SshProvider(**kwargs)
    if name == "local":
        from controller.providers.local import LocalProvider

        return LocalProvider(**kwargs)
    raise SpecError(f"unknown provider {name!r}: use vast, ssh or local")


def get_provider(spec: "RunSpec", *, journal: "Journal | None" = None, **kwargs: Any) -> Provider:
    return provider_named(spec.provider.type, journal=journal, **kwargs)
