"""Making the journal and the providers agree again: after a crash, and for ``gc``.

A crash between a rent intent and its result leaves a ``creating`` row; the provider settles it
by listing its instances by label (found: it is ours and recorded; not found: it never existed).
``gc`` goes further: every instance labelled ``flux-remote:`` that no live run owns is an orphan
(a duplicate from a lost create, a run whose destroy never finished, an instance from another
machine's journal) and is destroyed after confirmation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from controller.errors import CredentialsError

if TYPE_CHECKING:
    from controller.journal import Journal
    from controller.providers.base import Provider

ProviderFactory = Callable[[str], "Provider"]


def used_providers(journal: "Journal") -> set[str]:
    return {row["provider"] for row in journal.list_runs()}


def reconcile_all(journal: "Journal", factory: ProviderFactory) -> list[str]:
    """Settle every unfinished intent of every provider the journal has used."""
    lines: list[str] = []
    for name in sorted(used_providers(journal)):
        lines.extend(factory(name).reconcile(journal))
    return lines


def find_orphans(journal: "Journal", factory: ProviderFactory, *,
                 providers: tuple[str, ...] = ("vast",)) -> list[dict[str, Any]]:
    """Reconcile first, then list the orphans of each renting provider.

    A provider without credentials is skipped when the journal never used it (a user who only
    trains locally has no Vast key and no Vast instances).
    """
    found = []
    used = used_providers(journal)
    for name in providers:
        provider = factory(name)
        try:
            provider.reconcile(journal)
            orphans = provider.orphans(journal)
        except CredentialsError:
            if name in used:
                raise
            continue
        found.extend({**orphan, "provider": name} for orphan in orphans)
    return found


def destroy_orphans(journal: "Journal", factory: ProviderFactory,
                    orphans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Destroy each orphan (journaled and confirmed by its provider); returns those destroyed."""
    done = []
    for orphan in orphans:
        factory(orphan["provider"]).destroy_orphan(orphan, journal)
        done.append(orphan)
    return done
