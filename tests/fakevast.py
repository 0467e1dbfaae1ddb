"""FakeVast: a stateful stand-in for the Vast.ai REST API, served over real HTTP on 127.0.0.1.

Use it through ``VAST_URL`` (the ``fake_vast`` fixture sets it and ``VAST_API_KEY``)::

    with FakeVast() as fake:
        client = VastClient(fake.api_key, fake.url, min_intervals=NO_WAIT)
        iid = client.create_instance(fake.offers[0]["id"], image="img", disk_gb=40, label="x")

Payloads follow the real shapes in ``shared/reference/vast/``: offers are the reference search
results, instances are built like ``SYNTHETIC_instance_lifecycle.json``. Each behaviour below
names its source next to the code (vast-ai/vast-cli ``vastai/`` package, docs.vast.ai, or the
reference payloads); where the service's behaviour is not documented the comment says so.

State
    ``offers``        list of offer dicts; search filters them (``{"field": {"op": v}}``), orders
                      and limits like the API (``type: bid`` prices them at ``min_bid``); a
                      rented offer leaves the list. A filter on a field that is neither one the
                      vastai CLI knows nor one the offers carry is refused (400).
    ``instances``     id -> instance dict (``{"instances": null}`` once destroyed)
    ``requests``      every request: ``{"method", "path", "query", "headers", "json"}``
    ``ssh_keys``      instance id -> public keys attached with ``POST .../ssh/``
    ``credit``, ``balance``  the two money fields of ``GET /api/v0/users/current/``
    ``onstart_runs``  instance id -> ``[(returncode, output)]``, one per container start

Behaviour
    A new instance is not listed at all for ``unlisted_polls`` show calls (``{"instances":
    null}``, absent from the list), then has ``actual_status`` null once, ``loading`` for
    ``loading_polls`` shows (with ``loading_s``, also until that many seconds have passed since
    the create: the image pull's wall time), then ``running`` with the direct endpoint
    (``public_ipaddr`` +
    ``ports["22/tcp"]`` from ``ssh_endpoint``) and Vast's proxy (``ssh_host``/``ssh_port`` from
    ``proxy_endpoint``: a different address). Once running, the onstart script really runs
    (``bash -c``, after ``onstart_delay_s``) with the container variables (``CONTAINER_ID``,
    ``CONTAINER_API_KEY``, ...) and the image's ``PATH`` (``image_path``); SSH sessions get none
    of them (the test sshd passes no environment). Stop makes it ``exited`` (intended
    ``stopped``); start goes ``scheduling`` (``scheduling_polls`` shows) -> ``loading`` ->
    ``running`` and runs onstart again. The per-instance key (the create answer's
    ``instance_api_key``, in the container as ``CONTAINER_API_KEY``) may show, stop, start and
    destroy that one instance and nothing else.
    ``bill(iid)``: GPU hours (``hours``) x the rented ``dph_base`` while running, storage
    (``storage_cost`` $/GB/month x ``disk``) in every state until destroyed (``instance_hours``:
    create to destroy), and GB received x
    ``inet_down_cost`` (``image_gb`` at the first start, plus ``receive(iid, gb)``); the
    instance's ``dph_total`` is re-priced with its own disk, as ``allocated_storage`` does.
    ``containers`` (optional, e.g. ``tests.fakecontainer.Containers``): each instance gets its
    own container at its first ``running`` (``boot(iid)`` -> its SSH endpoint, instead of the
    shared ``ssh_endpoint``), its onstart runs inside it (``exec_prefix(iid)``), and destroy
    ends it (``destroy(iid)``); without it every instance is this machine, one filesystem.

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
    ``on_state(iid, status)``       called (outside the lock) when an instance stops or starts
                                    (a test stops its sshd with it: a stopped container has none)
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
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


# The PATH a plain Debian-based image sets (the sshd default is similar); ``image_path`` is
# where a test puts e.g. a conda bin dir first, as pytorch/pytorch's Dockerfile does with ENV.
DEFAULT_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOURS_PER_MONTH = 720.0  # reference README: dph_total = dph_base + storage_cost * GB / 720

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
# vast-cli vastai/api/query.py ``offers_fields``: the filter fields the CLI knows (it warns,
# "Unrecognized field", and sends the rest anyway). The service's answer to an unknown field is
# not documented; this fake refuses a field that is neither there nor in the offers it returns,
# so that a misspelt filter fails here instead of silently matching everything.
CLI_OFFER_FIELDS = frozenset("""
    bw_nvlink compute_cap cpu_arch cpu_cores cpu_cores_effective cpu_ghz cpu_ram cuda_max_good
    datacenter direct_port_count driver_version disk_bw disk_space dlperf dlperf_per_dphtotal
    dph_total duration external flops_per_dphtotal gpu_arch gpu_display_active gpu_frac
    gpu_mem_bw gpu_name gpu_ram gpu_total_ram gpu_max_power gpu_max_temp has_avx host_id id
    inet_down inet_down_cost inet_up inet_up_cost machine_id min_bid mobo_name num_gpus pci_gen
    pcie_bw reliability rentable rented storage_cost static_ip total_flops ubuntu_version
    verification verified vms_enabled geolocation cluster_id""".split())


def unknown_fields(query: dict[str, Any], offers: list[dict[str, Any]]) -> list[str]:
    """Filter fields of ``query`` that neither the CLI nor any offer knows."""
    known = set(CLI_OFFER_FIELDS) | _NOT_FILTERS
    for offer in offers:
        known.update(offer)
    return sorted(f for f in query if f not in known)


def offer_matches(offer: dict[str, Any], query: dict[str, Any]) -> bool:
    """Whether ``offer`` passes the ``{"field": {"op": value}}`` filters of a search query."""
    for field, cond in query.items():
        if field in _NOT_FILTERS or not isinstance(cond, dict):
            continue
        if field in _ALIASES:
            src, conv = _ALIASES[field]
            value: Any = conv(offer.get(src))
        else:
            value = offer.get(field)  # a field this offer lacks compares as null (no match)
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
                 ssh_endpoint: tuple[str, int] = ("127.0.0.1", 22),
                 proxy_endpoint: tuple[str, int] = ("ssh4.vast.ai.invalid", 10000),
                 unlisted_polls: int = 0, scheduling_polls: int = 1,
                 onstart_delay_s: float = 0.0, image_path: str = DEFAULT_IMAGE_PATH,
                 image_gb: float = 0.0, loading_s: float = 0.0, containers: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.api_key = api_key
        self.offers = offers if offers is not None else reference_offers()
        self.instances: dict[int, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.creates: list[dict[str, Any]] = []
        self.ssh_keys: dict[int, list[str]] = {}
        self.credit = 25.0
        self.balance = 0.0
        self.loading_polls = loading_polls
        self.ssh_endpoint = ssh_endpoint
        self.proxy_endpoint = proxy_endpoint
        self.unlisted_polls = unlisted_polls
        self.scheduling_polls = scheduling_polls
        self.onstart_delay_s = onstart_delay_s
        self.image_path = image_path
        self.image_gb = image_gb
        self.loading_s = loading_s
        self.containers = containers
        self.clock = clock
        self.on_state: Callable[[int, str], None] | None = None
        self.onstart_runs: dict[int, list[tuple[int, str]]] = {}
        self._meters: dict[int, dict[str, Any]] = {}
        self._container_keys: dict[str, int] = {}
        self._onstart_threads: list[threading.Thread] = []
        self.offer_gone_ids: set[int] = set()
        self.drop_create_response = False
        self.auth_error_status = 401
        self.list_page_size = 25
        self._faults: list[dict[str, Any]] = []
        self._changed: list[tuple[int, str]] = []
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
        for thread in self._onstart_threads:
            thread.join(timeout=30)

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
            self._stop_meter(instance_id)

    def outbid(self, instance_id: int) -> None:
        """A higher bid took the machine. vast-cli ``vastai/SKILL.md`` (Interruptible section):
        "When outbid, the instance moves to `stopped` (not destroyed) and storage charges
        continue. Resume by raising the bid"; the container's processes end with it. Shown as
        ``actual_status`` exited (the container has exited) with ``intended_status`` stopped."""
        with self._lock:
            self._outbid.add(instance_id)
            self._stop_meter(instance_id)  # the GPU is someone else's now; storage still bills
            self.instances[instance_id].update(actual_status="exited", intended_status="stopped",
                                               cur_state="stopped", ports={})
            self._changed.append((instance_id, "exited"))

    def image_pull_error(self, instance_id: int) -> None:
        """Make the instance fail its image pull the way Vast reports it."""
        with self._lock:
            self._pull_errors.add(instance_id)

    def receive(self, instance_id: int, gb: float) -> None:
        """The instance downloaded ``gb`` (pip, weights): billed at the offer's inet_down_cost."""
        with self._lock:
            self._meters[instance_id]["down_gb"] += gb

    def bill(self, instance_id: int) -> dict[str, float]:
        """What Vast charges this instance so far (or in all, once destroyed), in dollars.

        Reference README: GPU time while running at the rented price, storage in every state
        (stopped and loading included), bandwidth extra at ``inet_down_cost`` $/GB."""
        with self._lock:
            m = self._meters[instance_id]
            now = m["ended"] if m["ended"] is not None else self.clock()
            gpu_s = m["gpu_s"] + (now - m["running_since"] if m["running_since"] else 0.0)
            gpu = gpu_s / 3600 * m["dph_base"]
            storage = (now - m["created"]) / 3600 * m["storage_dph"]
            bandwidth = m["down_gb"] * m["inet_down_cost"]
            return {"gpu": gpu, "storage": storage, "bandwidth": bandwidth,
                    "total": gpu + storage + bandwidth, "hours": gpu_s / 3600,
                    "instance_hours": (now - m["created"]) / 3600}

    def created(self) -> list[int]:
        """Every instance id ever created (destroyed ones too): what ``bill`` can be asked."""
        with self._lock:
            return sorted(self._meters)

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
            auth = headers.get("Authorization") or ""
            scoped = self._container_keys.get(auth.removeprefix("Bearer "))
            if scoped is not None:
                # docs.vast.ai (instances/docker-environment, CONTAINER_API_KEY): the
                # per-instance key can start, stop or destroy its own instance, nothing more.
                if path.rstrip("/") != f"/api/v0/instances/{scoped}":
                    return 401, {"success": False, "error": "auth_error",
                                 "msg": "key not permitted for this endpoint"}
            elif auth != f"Bearer {self.api_key}":
                return self.auth_error_status, {"success": False, "error": "auth_error",
                                                "msg": "Invalid user key"}
            answer = self._route(method, path, query, body)
            changed, self._changed = self._changed, []
        for iid, status in changed:  # outside the lock: the callback may be slow (sshd)
            if self.on_state is not None:
                self.on_state(iid, status)
        return answer

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
            unknown = unknown_fields(body or {}, self.offers)
            if unknown:
                return 400, {"success": False, "error": "invalid_args",
                             "msg": f"Unrecognized field(s): {', '.join(unknown)}"}
            return 200, {"offers": self._search(body or {})}
        if method == "PUT" and parts[:3] == ["api", "v0", "asks"] and len(parts) == 4:
            return self._create(int(parts[3]), body or {})
        if method == "GET" and path == "/api/v1/instances/":
            return self._list(query)
        if method == "GET" and path == "/api/v0/instances/":
            return 410, {"success": False, "error": "deprecated_endpoint",
                         "msg": "/api/v0/instances/ is deprecated. Use /api/v1/instances/ instead."}
        if method == "GET" and path.rstrip("/") == "/api/v0/users/current":
            # vast-cli vastai/cli/display.py user_fields shows both "balance" and "credit";
            # docs.vast.ai's schema names "balance" only.
            return 200, {"id": 1, "email": "fake@example.com", "credit": self.credit,
                         "balance": self.balance}
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
        if query.get("allocated_storage") is not None:
            # Reference README: dph_total includes the disk asked for: dph_base + storage_cost
            # x allocated_storage GB / 720 (the reference offers were captured with 8 GB).
            for o in offers:
                o["dph_total"] = float(o.get("dph_base") or 0.0) + float(
                    o.get("storage_cost") or 0.0) * float(query["allocated_storage"]) \
                    / HOURS_PER_MONTH
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
        disk = float(body.get("disk") or 0.0)
        # Reference README: dph_total = dph_base + storage_cost * allocated GB / 720; the
        # instance is priced with its own disk (a bid at its own price, vast-cli create).
        dph_base = float(body["price"]) if body.get("price") is not None else \
            float(offer.get("dph_base") or 0.0)
        storage_dph = float(offer.get("storage_cost") or 0.0) * disk / HOURS_PER_MONTH
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
            "dph_base": dph_base,
            "dph_total": dph_base + storage_dph,
            "storage_cost": offer.get("storage_cost"),
            "inet_down_cost": offer.get("inet_down_cost"),
            "inet_up_cost": offer.get("inet_up_cost"),
            "gpu_name": offer.get("gpu_name"),
            "num_gpus": offer.get("num_gpus"),
            "machine_id": offer.get("machine_id"),
            "geolocation": offer.get("geolocation"),
            "image_runtype": body.get("runtype"),
            "image_uuid": body.get("image"),
            "disk_space": body.get("disk"),
        }
        self._meters[iid] = {"created": self.clock(), "ended": None, "running_since": None,
                             "gpu_s": 0.0, "dph_base": dph_base, "storage_dph": storage_dph,
                             "down_gb": 0.0, "pulled": False,
                             "inet_down_cost": float(offer.get("inet_down_cost") or 0.0)}
        self._polls[iid] = 0
        key = f"container-key-{iid}"
        self._container_keys[key] = iid
        if self.drop_create_response:
            self.drop_create_response = False
            return None
        # create_instance_response.json: the answer carries the per-instance key.
        return 200, {"success": True, "new_contract": iid, "instance_api_key": key}

    def _show(self, iid: int) -> dict[str, Any] | None:
        inst = self.instances.get(iid)
        if inst is None:
            return None
        self._polls[iid] += 1
        if self._polls[iid] <= self.unlisted_polls and inst["actual_status"] is None:
            # Issue 14 point 8 and the client's CREATE_READ_BACK_S: a new instance can read
            # back as {"instances": null} (and be absent from the list) for a while.
            return None
        polls = self._polls[iid] - self.unlisted_polls
        if inst["intended_status"] == "running" and inst["actual_status"] in (
                None, "loading", "scheduling"):
            if iid in self._pull_errors:
                inst.update(actual_status="loading", intended_status="stopped",
                            cur_state="stopped", status_msg="Error response from daemon: "
                            f"manifest for {inst['image_uuid']} not found")
            elif inst["actual_status"] == "scheduling" and polls <= self.scheduling_polls:
                pass  # vast-cli `start instance` epilog: a start waits in "scheduling"
            elif self._pulling(iid):
                # Reference README: "An instance can sit in `loading` for many minutes on a
                # slow image pull" (storage bills meanwhile, the GPU does not: bill()).
                if polls > 1:  # null once first, as below
                    inst.update(actual_status="loading",
                                status_msg=f"Pulling from {inst['image_uuid']}")
            elif self.loading_polls <= 0 or polls > self.loading_polls + (
                    self.scheduling_polls if inst.get("_restarted") else 1):
                self._make_running(iid, inst)
            elif polls > 1 or inst["actual_status"] == "scheduling":
                # SYNTHETIC_instance_lifecycle.json: null -> loading (image pull) -> running
                inst.update(actual_status="loading",
                            status_msg=f"Pulling from {inst['image_uuid']}")
        return self._public(inst)

    def _pulling(self, iid: int) -> bool:
        """Whether the first image pull of this instance is still under way (``loading_s``).
        Only the first start pulls: a stopped instance keeps its disk (reference README: storage
        is billed in every state), and the image with it, so a restart loads for its polls only
        (as ``image_gb`` is billed once; the docs do not say how long a restart loads)."""
        meter = self._meters[iid]
        return not meter["pulled"] and self.clock() - meter["created"] < self.loading_s

    @staticmethod
    def _public(inst: dict[str, Any]) -> dict[str, Any]:
        return {k: copy.deepcopy(v) for k, v in inst.items() if not k.startswith("_")}

    def _make_running(self, iid: int, inst: dict[str, Any]) -> None:
        host, port = self.containers.boot(iid) if self.containers is not None \
            else self.ssh_endpoint
        proxy_host, proxy_port = self.proxy_endpoint
        # Reference README: direct SSH is public_ipaddr + ports["22/tcp"][0]["HostPort"] (a
        # string); ssh_host/ssh_port is Vast's proxy, another address.
        inst.update(
            actual_status="running", cur_state="running",
            status_msg=f"success, running {inst['image_uuid']}/ssh",
            public_ipaddr=host, ssh_host=proxy_host, ssh_port=proxy_port + iid % 10000,
            ports={"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)},
                              {"HostIp": "::", "HostPort": str(port)}]},
            direct_port_start=port, direct_port_end=port,
        )
        meter = self._meters[iid]
        meter["running_since"] = self.clock()
        if not meter["pulled"]:  # the image is pulled once per machine; its bytes are billed
            meter["pulled"] = True
            meter["down_gb"] += self.image_gb
        self._changed.append((iid, "running"))
        self._start_onstart(iid, inst)

    def _start_onstart(self, iid: int, inst: dict[str, Any]) -> None:
        """Run the onstart script like the container does: after "running" is reported, with the
        container's variables (docs.vast.ai instances/docker-environment: set for PID 1 and the
        onstart script; SSH sessions do not get them) and the image's own PATH."""
        script = inst.get("onstart") or ""
        if not script:
            return
        env = {"PATH": self.image_path, "HOME": os.path.expanduser("~"), "LANG": "C.UTF-8",
               "CONTAINER_ID": str(iid), "CONTAINER_API_KEY": f"container-key-{iid}",
               "VAST_CONTAINERLABEL": f"C.{iid}", "PUBLIC_IPADDR": str(inst["public_ipaddr"]),
               **{str(k): str(v) for k, v in inst["extra_env"]}}
        delay = self.onstart_delay_s
        prefix = self.containers.exec_prefix(iid) if self.containers is not None else []

        def run() -> None:
            if delay:
                time.sleep(delay)
            proc = subprocess.run([*prefix, "bash", "-c", script], env=env, cwd="/", check=False,
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
            with self._lock:
                self.onstart_runs.setdefault(iid, []).append(
                    (proc.returncode, (proc.stdout + proc.stderr).decode("utf-8", "replace")))

        thread = threading.Thread(target=run, name=f"onstart-{iid}", daemon=True)
        self._onstart_threads.append(thread)
        thread.start()

    def _stop_meter(self, iid: int) -> None:
        meter = self._meters[iid]
        if meter["running_since"] is not None:
            meter["gpu_s"] += self.clock() - meter["running_since"]
            meter["running_since"] = None

    def _list(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        ordered = [self._public(self.instances[i]) for i in sorted(self.instances)
                   if self._polls[i] >= self.unlisted_polls
                   or self.instances[i]["actual_status"] is not None]
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
        elif body.get("state") == "stopped" and inst["intended_status"] != "stopped":
            # A stopped container reports "exited" (vast-cli instances.py _STATUS_COLORS has
            # running/loading/exited/created; SkyPilot's Vast provisioner treats exited as
            # stopped); its ports go away with it.
            self._stop_meter(iid)
            inst.update(actual_status="exited", intended_status="stopped", cur_state="stopped",
                        status_msg="Exited (0)", ports={})
            self._changed.append((iid, "exited"))
        elif body.get("state") == "running" and iid in self._outbid:
            inst["intended_status"] = "running"  # outbid: stays exited until its bid wins (outbid())
        elif body.get("state") == "running" and inst["actual_status"] != "running":
            # vast-cli `start instance` epilog: "scheduling" first, then the container loads.
            self._polls[iid] = self.unlisted_polls
            inst.update(actual_status="scheduling", intended_status="running",
                        cur_state="running", status_msg=None, _restarted=True)
        if "label" in body:
            inst["label"] = body["label"]
        return 200, {"success": True}

    def _destroy(self, iid: int) -> tuple[int, Any]:
        if self.instances.pop(iid, None) is None:
            return 404, {"success": False, "error": "no_such_instance", "msg": "no such instance"}
        self._stop_meter(iid)
        self._meters[iid]["ended"] = self.clock()
        if self.containers is not None:
            self.containers.destroy(iid)  # its processes and its disk go with it
        self._changed.append((iid, "destroyed"))
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
