"""VastClient over the real payload shapes (``responses``) and against FakeVast."""

from __future__ import annotations

import json

import pytest
import requests
import responses
from responses import matchers

from controller.errors import CredentialsError, OfferGoneError, ProviderError, QuotaError
from controller.vast.client import CREATE_READ_BACK_S, VastClient, find_api_key
from tests.fakevast import FakeVast, reference
from tests.faults import FakeClock

URL = "https://vast.test"
KEY = "sekrit-account-key-5f6b00960b7c4aeb"
NO_WAIT = {k: 0.0 for k in ("show", "create", "destroy", "list", "search", "other")}
ERRORS = reference("error_and_misc_responses.json")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def client(clock: FakeClock) -> VastClient:
    return VastClient(KEY, URL, sleep=clock.sleep, clock=clock, rng=lambda: 0.5)


@pytest.fixture
def rsps():
    with responses.RequestsMock() as mock:
        yield mock


def _body(call) -> dict:
    return json.loads(call.request.body)


def test_search_sends_query_and_bearer_key(client: VastClient, rsps) -> None:
    payload = reference("search_offers_ondemand.json")
    rsps.add(responses.POST, f"{URL}/api/v0/bundles/", json=payload)
    query = {"gpu_ram": {"gte": 24000}, "order": [["dph_total", "asc"]], "type": "on-demand"}
    offers = client.search_offers(query)
    assert [o["id"] for o in offers] == [38450985, 35365119, 50821030]
    call = rsps.calls[0]
    assert call.request.headers["Authorization"] == f"Bearer {KEY}"
    assert _body(call) == query
    assert KEY not in call.request.url


def test_create_sends_the_documented_body(client: VastClient, rsps) -> None:
    rsps.add(responses.PUT, f"{URL}/api/v0/asks/35365119/",
             json=reference("create_instance_response.json"))
    iid = client.create_instance(35365119, image="pytorch/pytorch:2.7.1", disk_gb=120,
                                 label="flux-remote:r1", env={"A": "1"}, onstart="echo hi")
    assert iid == 34935008
    body = _body(rsps.calls[0])
    assert body == {"client_id": "me", "image": "pytorch/pytorch:2.7.1", "disk": 120.0,
                    "label": "flux-remote:r1", "env": {"A": "1"}, "onstart": "echo hi",
                    "runtype": "ssh_direc ssh_proxy", "cancel_unavail": True}


def test_create_interruptible_sends_price(client: VastClient, rsps) -> None:
    rsps.add(responses.PUT, f"{URL}/api/v0/asks/33065167/", json={"success": True,
                                                                    "new_contract": 7})
    assert client.create_instance(33065167, image="i", disk_gb=40, label="l", price=0.27) == 7
    assert _body(rsps.calls[0])["price"] == 0.27


@pytest.mark.parametrize("case", ["create_404_offer_gone", "create_410_cancel_unavail"])
def test_offer_gone_is_not_retried(client: VastClient, rsps, case: str) -> None:
    rsps.add(responses.PUT, f"{URL}/api/v0/asks/1234567/", status=ERRORS[case]["status"],
             json=ERRORS[case]["json"])
    with pytest.raises(OfferGoneError):
        client.create_instance(1234567, image="i", disk_gb=40, label="l")
    assert len(rsps.calls) == 1


@pytest.mark.parametrize("case", ["rate_limited_429_text", "rate_limited_429_json"])
def test_429_then_success(client: VastClient, clock: FakeClock, rsps, case: str) -> None:
    err = ERRORS[case]
    kwargs = {"json": err["json"]} if "json" in err else {"body": err["body"]}
    rsps.add(responses.GET, f"{URL}/api/v0/instances/5/", status=429, **kwargs)
    running = reference("show_instance_running_captured.json")
    rsps.add(responses.GET, f"{URL}/api/v0/instances/5/", json=running)
    assert client.show_instance(5)["actual_status"] == "running"
    assert len(rsps.calls) == 2
    assert sum(clock.sleeps) >= 2.0  # backoff, and never closer than show's 2 s interval


def test_429_on_create_is_sent_again_without_read_back(client: VastClient, rsps) -> None:
    rsps.add(responses.PUT, f"{URL}/api/v0/asks/9/", status=429,
             json=ERRORS["rate_limited_429_json"]["json"])
    rsps.add(responses.PUT, f"{URL}/api/v0/asks/9/", json={"success": True, "new_contract": 11})
    assert client.create_instance(9, image="i", disk_gb=40, label="l") == 11
    assert [c.request.method for c in rsps.calls] == ["PUT", "PUT"]


def test_5xx_is_retried_then_gives_up(client: VastClient, clock: FakeClock, rsps) -> None:
    rsps.add(responses.POST, f"{URL}/api/v0/bundles/", status=502, body="bad gateway")
    rsps.add(responses.POST, f"{URL}/api/v0/bundles/", json={"offers": []})
    assert client.search_offers({}) == []
    assert len(rsps.calls) == 2
    flaky = VastClient(KEY, URL, sleep=clock.sleep, clock=clock, max_attempts=3)
    rsps.add(responses.GET, f"{URL}/api/v0/users/current", status=503, body="down")
    with pytest.raises(ProviderError, match="gave up after 3 attempts"):
        flaky.account_money()


def test_backoff_is_capped_and_grows(client: VastClient) -> None:
    delays = [client._backoff(n) for n in range(10)]
    assert delays == sorted(delays)
    assert max(delays) <= 60.0


def test_min_interval_between_calls_to_one_endpoint(client: VastClient, clock: FakeClock,
                                                    rsps) -> None:
    rsps.add(responses.GET, f"{URL}/api/v0/instances/5/", json={"instances": None})
    client.show_instance(5)
    client.show_instance(5)
    assert clock.sleeps == [2.0]


@pytest.mark.parametrize("case_status", [401, 404])
def test_bad_key_is_a_credentials_error(client: VastClient, rsps, case_status: int) -> None:
    rsps.add(responses.GET, f"{URL}/api/v0/users/current", status=case_status,
             json=ERRORS["bad_key"]["json"])
    with pytest.raises(CredentialsError) as info:
        client.account_money()
    assert "VAST_API_KEY" in str(info.value)
    assert KEY not in str(info.value)
    assert len(rsps.calls) == 1


def test_search_quota_is_never_retried(client: VastClient, rsps) -> None:
    rsps.add(responses.POST, f"{URL}/api/v0/bundles/", status=429,
             json=ERRORS["search_quota_429"]["json"])
    with pytest.raises(QuotaError):
        client.search_offers({})
    assert len(rsps.calls) == 1


def test_success_false_with_200_is_an_error(client: VastClient, rsps) -> None:
    rsps.add(responses.PUT, f"{URL}/api/v0/instances/5/",
             json={"success": False, "error": "invalid_args", "msg": "nope"})
    with pytest.raises(ProviderError, match="nope"):
        client.stop_instance(5)


def test_lost_create_answer_is_resolved_by_reading_back(client: VastClient, rsps) -> None:
    rsps.add(responses.PUT, f"{URL}/api/v0/asks/9/", body=requests.ReadTimeout("slow"))
    rsps.add(responses.GET, f"{URL}/api/v1/instances/", json={"instances": [
        {"id": 70, "label": "flux-remote:other"}, {"id": 71, "label": "flux-remote:r1"}]})
    assert client.create_instance(9, image="i", disk_gb=40, label="flux-remote:r1") == 71
    assert [c.request.method for c in rsps.calls] == ["PUT", "GET"]


def test_read_back_ignores_known_and_stopped_instances(client: VastClient, rsps) -> None:
    rsps.add(responses.PUT, f"{URL}/api/v0/asks/9/", body=requests.ConnectionError("reset"))
    rsps.add(responses.GET, f"{URL}/api/v1/instances/", json={"instances": [
        {"id": 80, "label": "flux-remote:r1", "intended_status": "running"},
        {"id": 81, "label": "flux-remote:r1", "intended_status": "stopped"}]})
    rsps.add(responses.PUT, f"{URL}/api/v0/asks/9/", json={"success": True, "new_contract": 82})
    assert client.create_instance(9, image="i", disk_gb=40, label="flux-remote:r1",
                                  known_ids=[80]) == 82


def test_lost_create_with_nothing_created_is_sent_again_after_the_window(
        client: VastClient, clock: FakeClock, rsps) -> None:
    rsps.add(responses.PUT, f"{URL}/api/v0/asks/9/", status=500, body="oops")
    rsps.add(responses.GET, f"{URL}/api/v1/instances/", json={"instances": []})
    rsps.add(responses.PUT, f"{URL}/api/v0/asks/9/", json={"success": True, "new_contract": 72})
    assert client.create_instance(9, image="i", disk_gb=40, label="flux-remote:r1") == 72
    looks = len(CREATE_READ_BACK_S)
    assert [c.request.method for c in rsps.calls] == ["PUT"] + ["GET"] * looks + ["PUT"]
    assert clock.sleeps[:looks] == list(CREATE_READ_BACK_S)  # the whole window, then resent
    assert sum(CREATE_READ_BACK_S) >= 30.0


def test_a_refused_create_is_retried_without_reading_back(clock: FakeClock) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on: the connection is refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client = VastClient(KEY, url, sleep=clock.sleep, clock=clock, rng=lambda: 0.5)
    with responses.RequestsMock(passthru_prefixes=(url,)) as rsps:
        with pytest.raises(ProviderError, match="could not connect"):
            client.create_instance(9, image="i", disk_gb=40, label="flux-remote:r1")
        assert not rsps.calls  # nothing was sent, so no listing by label
    assert not set(clock.sleeps) & set(CREATE_READ_BACK_S)  # only the backoff between tries


@pytest.mark.parametrize("shows_on_look", [2, 3])
def test_lost_create_listed_late_is_found_not_sent_again(
        client: VastClient, clock: FakeClock, rsps, shows_on_look: int) -> None:
    rsps.add(responses.PUT, f"{URL}/api/v0/asks/9/", body=requests.ReadTimeout("slow"))
    for _ in range(shows_on_look - 1):  # Vast does not list the new instance yet
        rsps.add(responses.GET, f"{URL}/api/v1/instances/", json={"instances": [
            {"id": 70, "label": "flux-remote:other"}]})
    rsps.add(responses.GET, f"{URL}/api/v1/instances/", json={"instances": [
        {"id": 70, "label": "flux-remote:other"}, {"id": 73, "label": "flux-remote:r1"}]})
    assert client.create_instance(9, image="i", disk_gb=40, label="flux-remote:r1") == 73
    assert [c.request.method for c in rsps.calls] == ["PUT"] + ["GET"] * shows_on_look
    assert clock.sleeps == list(CREATE_READ_BACK_S[:shows_on_look])  # injected: no real wait


def test_list_follows_pages_and_filters_by_label(client: VastClient, rsps) -> None:
    first = {"order_by": '[{"col": "id", "dir": "asc"}]', "limit": "25"}
    page2 = [matchers.query_param_matcher({**first, "after_token": "p2"})]
    rsps.add(responses.GET, f"{URL}/api/v1/instances/", match=page2,
             json={"instances": [{"id": 2, "label": "other"}, {"id": 3, "label": None}],
                   "next_token": None})
    rsps.add(responses.GET, f"{URL}/api/v1/instances/", match=[matchers.query_param_matcher(first)],
             json={"instances": [{"id": 1, "label": "flux-remote:a"}], "next_token": "p2"})
    assert [i["id"] for i in client.list_instances()] == [1, 2, 3]
    assert [i["id"] for i in client.list_instances("flux-remote:")] == [1]


def test_destroy_confirms_by_reading_back(client: VastClient, rsps) -> None:
    seq = reference("SYNTHETIC_instance_lifecycle.json")["sequence"]
    rsps.add(responses.DELETE, f"{URL}/api/v0/instances/40000001/", json=ERRORS["destroy_ok"]["json"])
    rsps.add(responses.GET, f"{URL}/api/v0/instances/40000001/", json=seq[2])
    rsps.add(responses.GET, f"{URL}/api/v0/instances/40000001/", json=seq[3])
    client.destroy_instance(40000001)
    assert [c.request.method for c in rsps.calls] == ["DELETE", "GET", "GET"]


def test_destroy_of_a_missing_instance_is_success(client: VastClient, rsps) -> None:
    rsps.add(responses.DELETE, f"{URL}/api/v0/instances/8/", status=404,
             json={"success": False, "error": "no_such_instance", "msg": "gone"})
    rsps.add(responses.GET, f"{URL}/api/v0/instances/8/", json={"instances": None})
    client.destroy_instance(8)


def test_destroy_that_never_confirms_raises(client: VastClient, rsps) -> None:
    seq = reference("SYNTHETIC_instance_lifecycle.json")["sequence"]
    rsps.add(responses.DELETE, f"{URL}/api/v0/instances/40000001/", json={"success": True})
    rsps.add(responses.GET, f"{URL}/api/v0/instances/40000001/", json=seq[2])
    with pytest.raises(ProviderError, match="still exists"):
        client.destroy_instance(40000001)


def test_stop_attach_and_balance_bodies(client: VastClient, rsps) -> None:
    rsps.add(responses.PUT, f"{URL}/api/v0/instances/5/", json={"success": True})
    rsps.add(responses.POST, f"{URL}/api/v0/instances/5/ssh/", json={"success": True})
    rsps.add(responses.GET, f"{URL}/api/v0/users/current", json={"credit": 12.5})
    client.stop_instance(5)
    client.attach_ssh_key(5, "ssh-ed25519 AAAA me\n")
    assert client.account_money() == {"credit": 12.5, "balance": None}
    assert _body(rsps.calls[0]) == {"state": "stopped"}
    assert _body(rsps.calls[1]) == {"ssh_key": "ssh-ed25519 AAAA me"}


def test_key_never_in_messages_or_repr(client: VastClient, rsps) -> None:
    rsps.add(responses.GET, f"{URL}/api/v0/instances/5/", status=400,
             json={"success": False, "error": "bad", "msg": f"key {KEY} is odd"})
    rsps.add(responses.GET, f"{URL}/api/v0/instances/6/", body=requests.ConnectionError(KEY))
    with pytest.raises(ProviderError) as first:
        client.show_instance(5)
    flaky = VastClient(KEY, URL, sleep=lambda s: None, max_attempts=1)
    with pytest.raises(ProviderError) as second:
        flaky.show_instance(6)
    for exc in (first.value, second.value):
        assert KEY not in str(exc) and KEY not in repr(exc)
        assert KEY not in str(exc.__cause__ or "")
    assert KEY not in repr(client) and KEY not in str(vars(client).get("_session"))


def test_key_lookup_order(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(CredentialsError, match="VAST_API_KEY"):
        find_api_key()
    (tmp_path / ".vast_api_key").write_text("from-home-file\n")
    assert find_api_key() == "from-home-file"
    (tmp_path / ".config" / "vastai").mkdir(parents=True)
    (tmp_path / ".config" / "vastai" / "vast_api_key").write_text("from-config\n")
    assert find_api_key() == "from-config"
    monkeypatch.setenv("VAST_API_KEY", "from-env")
    assert find_api_key() == "from-env"


def test_key_is_read_lazily(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    client = VastClient(base_url=URL)  # no key anywhere: constructing is fine
    with pytest.raises(CredentialsError):
        client.account_money()


def test_base_url_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAST_URL", "http://example.invalid:1/")
    assert VastClient("k").base_url == "http://example.invalid:1"
    monkeypatch.delenv("VAST_URL")
    assert VastClient("k").base_url == "https://console.vast.ai"


# -- FakeVast, through the client -------------------------------------------------------------


def _fake_client(fake: FakeVast, **kw) -> VastClient:
    return VastClient(fake.api_key, fake.url, timeout=5, min_intervals=NO_WAIT,
                      sleep=lambda s: None, **kw)


def test_fakevast_lifecycle_through_the_client(fake_vast: FakeVast) -> None:
    fake_vast.ssh_endpoint = ("127.0.0.1", 2222)
    client = VastClient(sleep=lambda s: None, min_intervals=NO_WAIT)  # URL and key from env
    offers = client.search_offers({"gpu_name": {"in": ["RTX 5090"]},
                                   "order": [["dph_total", "asc"]], "limit": 5})
    assert [o["id"] for o in offers] == [35365119, 50821030]
    iid = client.create_instance(35365119, image="img", disk_gb=40, label="flux-remote:r1",
                                 env={"RUN": "1"}, onstart="true")
    assert [o["id"] for o in client.search_offers({})].count(35365119) == 0
    states = [client.show_instance(iid)["actual_status"] for _ in range(4)]
    assert states == [None, "loading", "loading", "running"]
    inst = client.show_instance(iid)
    assert inst["ports"]["22/tcp"][0]["HostPort"] == "2222"
    assert inst["onstart"] == "true" and inst["extra_env"] == [["RUN", "1"]]
    client.attach_ssh_key(iid, "ssh-ed25519 AAAA x")
    assert fake_vast.ssh_keys[iid] == ["ssh-ed25519 AAAA x"]
    assert [i["id"] for i in client.list_instances("flux-remote:")] == [iid]
    client.stop_instance(iid)
    assert client.show_instance(iid)["actual_status"] == "exited"  # never "stopped" (vast-cli)
    client.destroy_instance(iid)
    assert client.show_instance(iid) is None
    client.destroy_instance(iid)  # again: already gone is success
    assert client.account_money() == {"credit": 25.0, "balance": 0.0}
    assert all(r["headers"]["Authorization"] == f"Bearer {fake_vast.api_key}"
               for r in fake_vast.requests)


def test_fakevast_dropped_create_yields_one_instance(fake_vast: FakeVast) -> None:
    fake_vast.drop_create_response = True
    client = _fake_client(fake_vast)
    iid = client.create_instance(38450985, image="img", disk_gb=40, label="flux-remote:r2")
    assert list(fake_vast.instances) == [iid]
    assert len(fake_vast.calls("PUT", "/api/v0/asks/")) == 1


def test_fakevast_create_listed_late_yields_one_instance(fake_vast: FakeVast) -> None:
    """The dropped create's instance is missing from the first two listings: still one PUT."""
    fake_vast.drop_create_response = True
    real_list = fake_vast._list
    lists = {"n": 0}

    def slow_list(query):
        lists["n"] += 1
        status, body = real_list(query)
        return status, (body if lists["n"] > 2 else {**body, "instances": []})

    fake_vast._list = slow_list  # type: ignore[method-assign]
    client = _fake_client(fake_vast)
    iid = client.create_instance(38450985, image="img", disk_gb=40, label="flux-remote:r3")
    assert list(fake_vast.instances) == [iid]
    assert len(fake_vast.calls("PUT", "/api/v0/asks/")) == 1
    assert len(fake_vast.calls("GET", "/api/v1/instances/")) == 3


def test_fakevast_faults(fake_vast: FakeVast) -> None:
    client = _fake_client(fake_vast)
    fake_vast.fail_next("POST", "/api/v0/bundles/", 429, "API requests too frequent", times=2)
    assert len(client.search_offers({})) == 5
    assert len(fake_vast.calls("POST", "/api/v0/bundles/")) == 3
    fake_vast.offer_gone_ids.add(38450985)
    with pytest.raises(OfferGoneError):
        client.create_instance(38450985, image="i", disk_gb=40, label="l")
    fake_vast.auth_error_status = 404
    with pytest.raises(CredentialsError):
        VastClient("wrong-key-123456", fake_vast.url, min_intervals=NO_WAIT).account_money()


def test_fakevast_list_pages(fake_vast: FakeVast) -> None:
    fake_vast.list_page_size = 2
    client = _fake_client(fake_vast)
    ids = [client.create_instance(o["id"], image="i", disk_gb=40, label=f"flux-remote:{n}")
           for n, o in enumerate(list(fake_vast.offers))]
    assert [i["id"] for i in client.list_instances()] == ids
    assert len(fake_vast.calls("GET", "/api/v1/instances/")) == 3


def test_redact_masks_known_secrets_only() -> None:
    from controller.redact import redact

    text = f"token={KEY} and hf_abcdefgh and {KEY}x"
    assert redact(text, [KEY, "hf_abcdefgh", "", "ab"]) == "token=*** and *** and ***x"
    assert redact("short ab ab", ["ab"]) == "short ab ab"  # too short to mask safely
    assert redact("aaaaaaaaaa", ["aaaaaa", "aaaaaaaaaa"]) == "***"  # longest first


def test_pacing_is_shared_by_threads_using_one_client() -> None:
    """A batch shares one client: concurrent callers queue behind each other's slots."""
    import threading

    slept: list[float] = []
    lock = threading.Lock()

    def sleep(seconds: float) -> None:
        with lock:
            slept.append(seconds)

    client = VastClient("k" * 64, base_url="http://127.0.0.1:9", clock=lambda: 100.0, sleep=sleep,
                        min_intervals={"search": 6.0})
    threads = [threading.Thread(target=client._pace, args=("search",)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(slept) == [6.0, 12.0]
