"""A thin client for the Vast.ai REST API: one method per endpoint, one ``requests`` session.

Contract of every method:
    * blocking; every request has a timeout; the bearer key goes only in a header;
    * idempotent calls (search, show, list, stop, destroy, attach key, balance) are retried on
      429, 5xx and network errors with capped exponential backoff and jitter;
    * create is not idempotent: a lost answer is resolved by reading back our labelled
      instances, patiently (``CREATE_READ_BACK_S``: Vast can list a new instance late), before
      anything is created again (never two paid instances for one intent);
    * calls to one endpoint are spaced by Vast's documented minimum interval (``MIN_INTERVALS``);
    * failures are ``controller.errors`` classes (see :mod:`controller.vast.errors`) whose
      messages never contain the key.

Clock and sleep are injected so tests never wait for real.
"""

from __future__ import annotations

import json

import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from controller.errors import CredentialsError, ProviderError
from controller.redact import redact
from controller.vast.errors import KEY_HINT, TransientError, error_for

DEFAULT_URL = "https://console.vast.ai"

# Seconds between two calls to the same endpoint (Vast's documented limits; search is about
# ten a minute).
MIN_INTERVALS: dict[str, float] = {
    "show": 2.0,
    "create": 4.5,
    "destroy": 3.0,
    "list": 1.0,
    "search": 6.0,
    "other": 1.0,
}
BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 60.0
MAX_ATTEMPTS = 6
DESTROY_CONFIRM_S = 120.0  # how long a destroyed instance may still show before we complain
MAX_LIST_PAGES = 50
LIST_PAGE_SIZE = 25  # the page size the vastai CLI asks for
# After a lost create answer: seconds to wait before each look for the labelled instance (one
# list call each, about 35 s in all). Vast may list a new instance only some seconds after it
# made it; sending the create again before the last look could rent a second paid instance.
CREATE_READ_BACK_S: tuple[float, ...] = (4.5, 10.0, 20.0)


class _Missing(Exception):
    """404 without an auth error: the instance does not exist (a success for destroy)."""


def _is_auth_error(body: Any) -> bool:
    return isinstance(body, dict) and body.get("error") == "auth_error"


def _never_connected(exc: Exception) -> bool:
    """True when the connection itself failed (refused, name not resolved): nothing was sent,
    so a create can be sent again at once, without reading back by label."""
    from urllib3.exceptions import NewConnectionError

    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return isinstance(reason, NewConnectionError)


def key_paths(env: Mapping[str, str] | None = None) -> list[Path]:
    """Where the vastai CLI keeps the key, in the order it looks (vast-cli ``vastai/_base.py``
    ``_resolve_api_key``): ``$XDG_CONFIG_HOME/vastai/vast_api_key`` (the xdg package's
    ``xdg_config_home()``: the variable when it is an absolute path, else ``~/.config``), then
    the legacy ``~/.vast_api_key``."""
    env = os.environ if env is None else env
    home = Path.home()
    xdg = env.get("XDG_CONFIG_HOME") or ""
    config = Path(xdg) if os.path.isabs(xdg) else home / ".config"
    return [config / "vastai" / "vast_api_key", home / ".vast_api_key"]


def find_api_key() -> str:
    """The account key: ``VAST_API_KEY``, else the vastai CLI's key files. Raises CredentialsError."""
    env = os.environ.get("VAST_API_KEY", "").strip()
    if env:
        return env
    for path in key_paths():
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if value:
            return value
    raise CredentialsError("no Vast.ai API key found", hint=KEY_HINT)


class VastClient:
    """Calls the Vast.ai API. The key is read on first use, so offline planning needs none."""

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        *,
        timeout: float = 30.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        min_intervals: dict[str, float] | None = None,
        max_attempts: int = MAX_ATTEMPTS,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._api_key = api_key.strip() if api_key else None
        self.base_url = (base_url or os.environ.get("VAST_URL") or DEFAULT_URL).rstrip("/")
        self.timeout = timeout
        self._sleep = sleep
        self._clock = clock
        self.min_intervals = {**MIN_INTERVALS, **(min_intervals or {})}
        self.max_attempts = max(1, max_attempts)
        self._rng = rng
        self._last_call: dict[str, float] = {}
        self._pace_lock = threading.Lock()
        self._session: Any = None  # requests.Session, made on first use (import kept lazy)

    def __repr__(self) -> str:
        state = "set" if self._api_key else "unresolved"
        return f"VastClient(base_url={self.base_url!r}, key={state})"

    # -- endpoints -------------------------------------------------------------------------

    def search_offers(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        """``POST /api/v0/bundles/``: the offers matching ``query`` (see controller.planning.planner)."""
        data = self._call("search", "POST", "/api/v0/bundles/", json_body=query, what="search offers")
        return list(data.get("offers") or [])

    def create_instance(
        self,
        offer_id: int,
        *,
        image: str,
        disk_gb: float,
        label: str,
        env: dict[str, str] | None = None,
        onstart: str | None = None,
        price: float | None = None,
        known_ids: Iterable[int] = (),
    ) -> int:
        """Rent ``offer_id``; returns the new instance id. ``price`` only for interruptible (bid).

        Raises OfferGoneError when the offer was taken. A timeout, dropped connection or 5xx
        after sending is resolved by listing instances labelled ``label`` on the
        ``CREATE_READ_BACK_S`` schedule: as soon as one exists that is not in ``known_ids``
        (instances the caller already had under that label) and is meant to run, it is ours and
        its id is returned; only when none has shown by the last look is the create sent again.
        """
        body: dict[str, Any] = {
            "client_id": "me",
            "image": image,
            "disk": float(disk_gb),
            "label": label,
            "env": dict(env or {}),
            "onstart": onstart or "",
            "runtype": "ssh_direc ssh_proxy",
            "cancel_unavail": True,
        }
        if price is not None:
            body["price"] = float(price)
        what = f"create instance on offer {offer_id}"
        last: TransientError | None = None
        for attempt in range(self.max_attempts):
            if attempt:
                self._sleep(self._backoff(attempt - 1))
            try:
                data = self._call("create", "PUT", f"/api/v0/asks/{int(offer_id)}/",
                                  json_body=body, what=what, retry=False)
            except TransientError as exc:
                last = exc
                if exc.sent:
                    found = self._read_back(label, exclude={int(i) for i in known_ids})
                    if found is not None:
                        return found
                continue
            contract = data.get("new_contract")
            if contract is None:
                raise ProviderError(f"Vast.ai answered {what} without an instance id")
            return int(contract)
        raise ProviderError(f"{what} failed after {self.max_attempts} attempts: {last}")

    def show_instance(self, instance_id: int) -> dict[str, Any] | None:
        """``GET /api/v0/instances/{id}/``: the instance, or None once it no longer exists."""
        try:
            data = self._call("show", "GET", f"/api/v0/instances/{int(instance_id)}/",
                              what=f"show instance {instance_id}", missing_ok=True)
        except _Missing:
            return None
        inst = data.get("instances")
        return inst if isinstance(inst, dict) and inst else None

    def list_instances(self, label_prefix: str | None = None) -> list[dict[str, Any]]:
        """``GET /api/v1/instances/`` (all pages): our instances, optionally by label prefix."""
        found: list[dict[str, Any]] = []
        # As the vastai CLI pages it: by id, a page at a time, the answer's ``next_token`` sent
        # back as ``after_token`` (an unknown parameter would be ignored: page one, forever).
        params: dict[str, Any] = {"order_by": json.dumps([{"col": "id", "dir": "asc"}]),
                                  "limit": LIST_PAGE_SIZE}
        seen_tokens: set[str] = set()
        for _ in range(MAX_LIST_PAGES):
            data = self._call("list", "GET", "/api/v1/instances/", params=params,
                              what="list instances")
            found.extend(i for i in (data.get("instances") or []) if isinstance(i, dict))
            token = data.get("next_token")
            if not token or str(token) in seen_tokens:
                break
            seen_tokens.add(str(token))
            params = {**params, "after_token": token}
        if label_prefix is None:
            return found
        return [i for i in found if str(i.get("label") or "").startswith(label_prefix)]

    def attach_ssh_key(self, instance_id: int, public_key: str) -> None:
        """``POST /api/v0/instances/{id}/ssh/``: let ``public_key`` log in as root."""
        self._call("other", "POST", f"/api/v0/instances/{int(instance_id)}/ssh/",
                   json_body={"ssh_key": public_key.strip()},
                   what=f"attach ssh key to instance {instance_id}")

    def stop_instance(self, instance_id: int) -> None:
        """Stop (keep the disk, stop GPU billing): ``PUT .../instances/{id}/ {"state":"stopped"}``."""
        self._call("other", "PUT", f"/api/v0/instances/{int(instance_id)}/",
                   json_body={"state": "stopped"}, what=f"stop instance {instance_id}")

    def label_instance(self, instance_id: int, label: str) -> None:
        """Rename an instance: ``PUT .../instances/{id}/ {"label": ...}`` (vast-cli
        ``label instance``)."""
        self._call("other", "PUT", f"/api/v0/instances/{int(instance_id)}/",
                   json_body={"label": label}, what=f"label instance {instance_id}")

    def start_instance(self, instance_id: int) -> None:
        """Start a stopped instance again: ``PUT .../instances/{id}/ {"state":"running"}``."""
        self._call("other", "PUT", f"/api/v0/instances/{int(instance_id)}/",
                   json_body={"state": "running"}, what=f"start instance {instance_id}")

    def destroy_instance(self, instance_id: int) -> None:
        """Destroy and confirm by reading back ``{"instances": null}``. Already gone = success.

        Raises ProviderError when the instance still shows after ``DESTROY_CONFIRM_S``.
        """
        try:
            self._call("destroy", "DELETE", f"/api/v0/instances/{int(instance_id)}/",
                       what=f"destroy instance {instance_id}", missing_ok=True)
        except _Missing:
            pass
        started = self._clock()
        while self.show_instance(instance_id) is not None:
            if self._clock() - started > DESTROY_CONFIRM_S:
                raise ProviderError(
                    f"instance {instance_id} still exists {DESTROY_CONFIRM_S:.0f} s after destroy",
                    hint=f"check https://cloud.vast.ai/instances/ and destroy {instance_id} by hand",
                )

    def account_money(self) -> dict[str, float | None]:
        """``GET /api/v0/users/current`` (as vast-cli ``show_user`` calls it): the account's
        ``credit`` and ``balance`` in dollars (None when absent). Which one is the spendable
        prepaid amount is not documented: the docs' schema names only ``balance`` ("the current
        balance of the user"), the vastai CLI's ``show user`` prints both. Callers show both and
        refuse nothing on them."""
        data = self._call("other", "GET", "/api/v0/users/current", what="read the account")

        def money(key: str) -> float | None:
            try:
                return float(data[key])
            except (KeyError, TypeError, ValueError):
                return None
        return {"credit": money("credit"), "balance": money("balance")}

    # -- plumbing --------------------------------------------------------------------------

    @property
    def api_key(self) -> str:
        if self._api_key is None:
            self._api_key = find_api_key()
        return self._api_key

    def _redact(self, text: str) -> str:
        return redact(text, [self._api_key or ""])

    def _read_back(self, label: str, exclude: set[int]) -> int | None:
        """Look for the instance a lost create may have made, once per ``CREATE_READ_BACK_S``
        delay; the id as soon as it shows, None when it never did."""
        for delay in CREATE_READ_BACK_S:
            self._sleep(delay)
            found = self._find_labelled(label, exclude)
            if found is not None:
                return found
        return None

    def _find_labelled(self, label: str, exclude: set[int]) -> int | None:
        """The newest instance carrying exactly ``label`` that is meant to run (a fresh create
        has intended_status running; a stopped one was kept on purpose), or None."""
        mine = [i for i in self.list_instances(label)
                if i.get("label") == label and int(i.get("id") or 0) not in exclude
                and str(i.get("intended_status") or "running") != "stopped"]
        if not mine:
            return None
        return int(max(mine, key=lambda i: int(i.get("id") or 0))["id"])

    def _backoff(self, attempt: int) -> float:
        """Capped exponential backoff with equal jitter: half fixed, half random."""
        delay = min(BACKOFF_CAP_S, BACKOFF_BASE_S * (2 ** attempt))
        return delay / 2 + self._rng() * delay / 2

    def _pace(self, kind: str) -> None:
        """Keep Vast's minimum interval per endpoint kind, across every thread using this client.

        A batch shares one client (the limits are per account), so each caller takes the next
        free slot under the lock and sleeps outside it.
        """
        interval = self.min_intervals.get(kind, self.min_intervals["other"])
        with self._pace_lock:
            now = self._clock()
            last = self._last_call.get(kind)
            slot = now if last is None else max(now, last + interval)
            self._last_call[kind] = slot
        if slot > now:
            self._sleep(slot - now)

    def _call(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        what: str,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        retry: bool = True,
        missing_ok: bool = False,
    ) -> dict[str, Any]:
        attempt = 0
        while True:
            try:
                return self._once(kind, method, path, what=what, json_body=json_body,
                                  params=params, missing_ok=missing_ok)
            except TransientError as exc:
                attempt += 1
                if not retry:
                    raise
                if attempt >= self.max_attempts:
                    raise ProviderError(
                        f"{exc.message} (gave up after {attempt} attempts)",
                        hint="Vast.ai may be having trouble; try again in a few minutes",
                    ) from exc
                self._sleep(self._backoff(attempt - 1))

    def _once(self, kind: str, method: str, path: str, *, what: str, json_body: Any,
              params: dict[str, Any] | None, missing_ok: bool) -> dict[str, Any]:
        import requests

        if self._session is None:
            self._session = requests.Session()
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"}
        self._pace(kind)
        try:
            resp = self._session.request(method, self.base_url + path, json=json_body,
                                         params=params, headers=headers, timeout=self.timeout)
        except requests.ConnectTimeout as exc:
            raise TransientError(self._redact(f"{what}: could not connect ({exc})"),
                                 sent=False) from None
        except requests.ConnectionError as exc:
            if not _never_connected(exc):
                raise TransientError(self._redact(f"{what}: no answer ({type(exc).__name__})"),
                                     sent=True) from None
            raise TransientError(self._redact(f"{what}: could not connect (refused or unresolved)"),
                                 sent=False) from None
        except (requests.Timeout, requests.ConnectionError) as exc:
            raise TransientError(self._redact(f"{what}: no answer ({type(exc).__name__})"),
                                 sent=True) from None
        try:
            body: Any = resp.json()
        except ValueError:
            body = resp.text
        if missing_ok and resp.status_code == 404 and not _is_auth_error(body):
            raise _Missing()
        error = error_for(resp.status_code, body, what=what, scrub=self._redact)
        if error is not None:
            if isinstance(error, TransientError) and resp.status_code == 429:
                error.sent = False  # refused before it was processed: safe to send again
            raise error
        if not isinstance(body, dict):
            raise ProviderError(f"Vast.ai answered {what} with something that is not JSON: "
                                f"{self._redact(str(body)[:200])}")
        return body
