"""FakeVast: a stateful stand-in for the Vast.ai REST API, served over real HTTP on 127.0.0.1.

Use it through ``VAST_URL`` (the ``fake_vast`` fixture sets it and ``VAST_API_KEY``)::

    with FakeVast() as fake:
        client = VastClient(fake.api_key, fake.url, min_intervals=NO_WAIT)
        iid = client.create_instance(fake.offers[0]["id"], image="img", disk_gb=40, label="x")

Payloads follow the real shapes in ``shared/reference/vast/``: offers are the reference search
results, instances are built like ``SYNTHETIC_instance_lifecycle.json``.

State
    ``offers``        list of offer dicts; search filters them (``{"field": {"op": v}}``), orders
                      and limits like the API (``type: bid`` prices them at ``min_bid``); a
                      rented offer leaves the list
    ``instances``     id -> instance dict (``{"instances": null}`` once destroyed)
    ``requests``      every request: ``{"method", "path", "query", "headers", "json"}``
    ``ssh_keys``      instance id -> public keys attached with ``POST .../ssh/``
    ``balance``       the account's credit

Behaviour
    A new instance has ``actual_status`` null. Each show call moves it on: the first still
    sees null, the next ``loading_polls`` see ``loading``, then it is ``running`` (at once
    when ``loading_polls`` is 0) with ``public_ipaddr`` / ``ports["22/tcp"]``
    from ``ssh_endpoint`` (host, port) and ``ssh_host``/``ssh_port`` (the proxy) set to the
    same values. Stop sets actual/intended ``stopped``; destroy removes it.
    ``env`` and ``onstart`` of each create are kept on the instance (``extra_env`` as Vast
    lists them, plus ``onstart``) and in ``creates`` (the raw bodies).

Fault knobs
    ``api_key``                     the Bearer key accepted (anything else: 401 auth_error,
                                    or 404 auth_error when ``auth_error_status = 404``)
    ``fail_next(method, path_prefix, status, body, times=1)``
                                    answer the next matching requests with ``status`` and
                                    ``body`` (dict -> JSON, str -> plain text)
    ``drop_create_response = True`` the next create makes the instance, then closes the
                                    connection without answering (the client sees a lost answer)
    ``offer_gone_ids``              creates on these offer ids answer 404 ``no_such_ask``
    ``interrupt(instance_id, status="exited")``
                                    the host dies: actual_status becomes ``status``
    ``outbid(instance_id)``         a higher bid takes an interruptible instance's GPU: it stops
                                    (actual ``exited``, intended ``stopped``) and a start leaves
                                    it stopped while outbid
    ``image_pull_error(instance_id)`` loading with the daemon's pull error, then
                                    intended_status stopped (SYNTHETIC_instance_image_pull_failed)
    ``list_page_size``              instances per page of ``GET /api/v1/instances/``
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

_HERE = Path(__file__).resolve()
# Copies of shared/reference/vast/ (see tests/data/reference/README.md).
REFERENCE = _HERE.parent / "data" / "reference" / "vast"


def reference(name: str) -> Any:
    """One reference payload, parsed."""
    return json.loads((REFERENCE / name).read_text(encoding="utf-8"))


def reference_offers() -> list[dict[str, Any]]:
    """The real on-demand offers followed by the real interruptible ones (fresh copies)."""
    return (copy.deepcopy(reference("search_offers_ondemand.json")["offers"])
            + copy.deepcopy(reference("search_offers_bid.json")["offers"]))


_OPS = {
    "eq": lambda a, b: a == b,
    "neq": lambda a, b: a != b,
    "gt": lambda a, b: a is not None and a > b,
    "gte": lambda a, b: a is not None and a >= b,
    "lt": lambda a, b: a is not None and a < b,
    "lte": lambda a, b: a is not None and a <= b,
    "in": lambda a, b: a in b,
    "notin": lambda a, b: a not in b,
}
# Query fields the API accepts under another name than the offer's field.
_ALIASES = {"verified": ("verification", lambda v: v == "verified")}
_NOT_FILTERS = {"order", "type", "limit", "allocated_storage"}


def offer_matches(offer: dict[str, Any], query: dict[str, Any]) -> bool:
    """Whether ``offer`` passes the ``{"field": {"op": value}}`` filters of a search query."""
    for field, cond in query.items():
        if field in _NOT_FILTERS or not isinstance(cond, dict):
            continue
        if field in _ALIASES:
            src, conv = _ALIASES[field]
            value: Any = conv(offer.get(src))
        elif field in offer:
            value = offer[field]
        else:
            continue  # a filter on a field the fake does not model is ignored
        for op, expected in cond.items():
            check = _OPS.get(op)
            if check is None:
                continue
            try:
                if not check(value, expected):
                    return False
            except TypeError:
                return False
    return True


class FakeVast:
    """The fake API. Start with ``with FakeVast() as fake`` or ``start()`` / ``stop()``."""

    def __init__(self, *, api_key: str = "fake-vast-key-0123456789abcdef",
                 offers: list[dict[str, Any]] | None = None, loading_polls: int = 2,
                 ssh_endpoint: tuple[str, int] = ("127.0.0.1", 22)) -> None:
        self.api_key = api_key
        self.offers = offers if offers is not None else reference_offers()
        self.instances: dict[int, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.creates: list[dict[str, Any]] = []
        self.ssh_keys: dict[int, list[str]] = {}
        self.balance = 25.0
        self.loading_polls = loading_polls
        self.ssh_endpoint = ssh_endpoint
        self.offer_gone_ids: set[int] = set()
        self.drop_create_response = False
        self.auth_error_status = 401
        self.list_page_size = 25
        self._faults: list[dict[str, Any]] = []
        self._polls: dict[int, int] = {}
        self._pull_errors: set[int] = set()
        self._outbid: set[int] = set()
        self._ids = itertools.count(40000001)
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "FakeVast":
        fake = self

        class Handler(_Handler):
            owner = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        server = self._server
        self._thread = threading.Thread(target=lambda: server.serve_forever(poll_interval=0.05),
                                        name="fakevast", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "FakeVast":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "FakeVast is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- knobs -----------------------------------------------------------------------------

    def fail_next(self, method: str, path_prefix: str, status: int, body: Any = None,
                  times: int = 1) -> None:
        """Answer the next ``times`` requests matching method and path prefix with an error."""
        with self._lock:
            self._faults.append({"method": method.upper(), "prefix": path_prefix,
                                 "status": status, "body": body, "times": times})

    def interrupt(self, instance_id: int, status: str = "exited") -> None:
        """The host went away: the instance's actual_status becomes ``status``."""
        with self._lock:
            self.instances[instance_id]["actual_status"] = status
            self.instances[instance_id]["cur_state"] = status

    def outbid(self, instance_id: int) -> None:
        """A higher bid took the machine. vast-cli ``vastai/SKILL.md`` (Interruptible section):
        "When outbid, the instance moves to `stopped` (not destroyed) and storage charges
        continue. Resume by raising the bid"; the container's processes end with it. Shown as
        ``actual_status`` exited (the container has exited) with ``intended_status`` stopped."""
        with self._lock:
            self._outbid.add(instance_id)
            self.instances[instance_id].update(actual_status="exited", intended_status="stopped",
                                               cur_state="stopped")

    def image_pull_error(self, instance_id: int) -> None:
        """Make the instance fail its image pull the way Vast reports it."""
        with self._lock:
            self._pull_errors.add(instance_id)

    def calls(self, method: str, path_prefix: str = "") -> list[dict[str, Any]]:
        """The logged requests with this method and path prefix."""
        with self._lock:
            return [r for r in self.requests
                    if r["method"] == method.upper() and r["path"].startswith(path_prefix)]

    # -- request handling (called from the server threads) -----------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str],
               body: Any) -> tuple[int, Any] | None:
        """One request -> (status, body); None means: drop the connection without answering."""
        with self._lock:
            self.requests.append({"method": method, "path": path, "query": query,
                                  "headers": headers, "json": body})
            fault = self._take_fault(method, path)
            if fault is not None:
                return fault
            if headers.get("Authorization") != f"Bearer {self.api_key}":
                return self.auth_error_status, {"success": False, "error": "auth_error",
                                                "msg": "Invalid user key"}
            return self._route(method, path, query, body)

    def _take_fault(self, method: str, path: str) -> tuple[int, Any] | None:
        for fault in self._faults:
            if fault["method"] == method and path.startswith(fault["prefix"]):
                fault["times"] -= 1
                if fault["times"] <= 0:
                    self._faults.remove(fault)
                return fault["status"], fault["body"]
        return None

    def _route(self, method: str, path: str, query: dict[str, list[str]],
               body: Any) -> tuple[int, Any] | None:
        parts = [p for p in path.split("/") if p]
        if method == "POST" and path == "/api/v0/bundles/":
            return 200, {"offers": self._search(body or {})}
        if method == "PUT" and parts[:3] == ["api", "v0", "asks"] and len(parts) == 4:
            return self._create(int(parts[3]), body or {})
        if method == "GET" and path == "/api/v1/instances/":
            return self._list(query)
        if method == "GET" and path == "/api/v0/instances/":
            return 410, {"success": False, "error": "deprecated_endpoint",
                         "msg": "/api/v0/instances/ is deprecated. Use /api/v1/instances/ instead."}
        if method == "GET" and path == "/api/v0/users/current":
            return 200, {"id": 1, "email": "fake@example.com", "credit": self.balance}
        if parts[:3] == ["api", "v0", "instances"] and len(parts) >= 4:
            iid = int(parts[3])
            if len(parts) == 5 and parts[4] == "ssh" and method == "POST":
                return self._attach(iid, body or {})
            if len(parts) == 4 and method == "GET":
                return 200, {"instances": self._show(iid)}
            if len(parts) == 4 and method == "PUT":
                return self._update(iid, body or {})
            if len(parts) == 4 and method == "DELETE":
                return self._destroy(iid)
        return 404, {"success": False, "error": "not_found", "msg": f"no route {method} {path}"}

    def _search(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        offers = copy.deepcopy(self.offers)
        if query.get("type") == "bid":  # interruptible prices: the minimum bid + storage
            for o in offers:
                storage = float(o.get("dph_total", 0)) - float(o.get("dph_base", 0))
                o["dph_base"] = o.get("min_bid", o.get("dph_base"))
                o["dph_total"] = float(o["dph_base"]) + storage
        found = [o for o in offers if offer_matches(o, query)]
        for field, direction in reversed(query.get("order") or []):
            found.sort(key=lambda o: (o.get(field) is None, o.get(field) or 0),
                       reverse=direction == "desc")
        return found[: int(query.get("limit") or 64)]

    def _create(self, offer_id: int, body: dict[str, Any]) -> tuple[int, Any] | None:
        offer = next((o for o in self.offers if int(o["id"]) == offer_id), None)
        if offer is None or offer_id in self.offer_gone_ids:
            return 404, {"success": False, "error": "invalid_args", "ask_id": offer_id,
                         "msg": f"error 404/3603: no_such_ask Instance type by id {offer_id} "
                                "is not available."}
        self.offers.remove(offer)
        self.creates.append(copy.deepcopy(body))
        iid = next(self._ids)
        self.instances[iid] = {
            "id": iid,
            "actual_status": None,
            "intended_status": "running",
            "cur_state": "running",
            "status_msg": None,
            "label": body.get("label"),
            "start_date": 1790620000.0,
            "extra_env": [[k, v] for k, v in (body.get("env") or {}).items()],
            "onstart": body.get("onstart"),
            "ssh_host": None,
            "ssh_port": None,
            "public_ipaddr": offer.get("public_ipaddr"),
            "ports": {},
            "direct_port_start": -1,
            "direct_port_end": -1,
            "dph_total": offer.get("dph_total"),
            "gpu_name": offer.get("gpu_name"),
            "num_gpus": offer.get("num_gpus"),
            "machine_id": offer.get("machine_id"),
            "geolocation": offer.get("geolocation"),
            "image_runtype": body.get("runtype"),
            "image_uuid": body.get("image"),
            "disk_space": body.get("disk"),
        }
        self._polls[iid] = 0
        if self.drop_create_response:
            self.drop_create_response = False
            return None
        return 200, {"success": True, "new_contract": iid,
                     "instance_api_key": f"container-key-{iid}"}

    def _show(self, iid: int) -> dict[str, Any] | None:
        inst = self.instances.get(iid)
        if inst is None:
            return None
        self._polls[iid] += 1
        if inst["intended_status"] == "running" and inst["actual_status"] in (None, "loading"):
            if iid in self._pull_errors:
                inst.update(actual_status="loading", intended_status="stopped",
                            cur_state="stopped", status_msg="Error response from daemon: "
                            f"manifest for {inst['image_uuid']} not found")
            elif self.loading_polls <= 0 or self._polls[iid] > self.loading_polls + 1:
                self._make_running(inst)
            elif self._polls[iid] > 1:  # the first look still sees it provisioning (null)
                inst.update(actual_status="loading",
                            status_msg=f"Pulling from {inst['image_uuid']}")
        return copy.deepcopy(inst)

    def _make_running(self, inst: dict[str, Any]) -> None:
        host, port = self.ssh_endpoint
        inst.update(
            actual_status="running", cur_state="running",
            status_msg=f"success, running {inst['image_uuid']}/ssh",
            public_ipaddr=host, ssh_host=host, ssh_port=port,
            ports={"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)},
                              {"HostIp": "::", "HostPort": str(port)}]},
            direct_port_start=port, direct_port_end=port,
        )

    def _list(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        ordered = [copy.deepcopy(self.instances[i]) for i in sorted(self.instances)]
        # Vast's cursor: the answer's next_token comes back as after_token (as the vastai CLI
        # sends it); any other parameter is ignored, so a client that misnames it sees page one.
        start = int((query.get("after_token") or ["0"])[0])
        size = min(self.list_page_size, int((query.get("limit") or [self.list_page_size])[0]))
        page = ordered[start:start + size]
        body: dict[str, Any] = {"instances": page, "next_token": None}
        if start + size < len(ordered):
            body["next_token"] = str(start + size)
        return 200, body

    def _attach(self, iid: int, body: dict[str, Any]) -> tuple[int, Any]:
        if iid not in self.instances:
            return 404, {"success": False, "error": "no_such_instance", "msg": "no such instance"}
        self.ssh_keys.setdefault(iid, []).append(str(body.get("ssh_key")))
        return 200, {"success": True}

    def _update(self, iid: int, body: dict[str, Any]) -> tuple[int, Any]:
        inst = self.instances.get(iid)
        if inst is None:
            return 404, {"success": False, "error": "no_such_instance", "msg": "no such instance"}
        if body.get("state") == "stopped" and iid in self._outbid:
            inst["intended_status"] = "stopped"  # its container has exited already (outbid())
        elif body.get("state") == "stopped":
            inst.update(actual_status="stopped", intended_status="stopped", cur_state="stopped")
        elif body.get("state") == "running":
            inst["intended_status"] = "running"
            if iid not in self._outbid:  # outbid: stays exited until its bid wins (outbid())
                self._make_running(inst)
        if "label" in body:
            inst["label"] = body["label"]
        return 200, {"success": True}

    def _destroy(self, iid: int) -> tuple[int, Any]:
        if self.instances.pop(iid, None) is None:
            return 404, {"success": False, "error": "no_such_instance", "msg": "no such instance"}
        return 200, {"success": True}


class _Handler(BaseHTTPRequestHandler):
    owner: FakeVast
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stalls

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        return None

    def _serve(self) -> None:
        split = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        answer = self.owner.handle(self.command, split.path, parse_qs(split.query),
                                   dict(self.headers.items()), body)
        if answer is None:
            self.close_connection = True
            self.connection.close()
            return
        status, payload = answer
        if isinstance(payload, str):
            data, ctype = payload.encode(), "text/plain"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve
