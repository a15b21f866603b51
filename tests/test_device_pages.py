"""GET /v1/devices a page at a time, `edgeops device list`, and GET /v1/drift's default summary: paging
through every page gives exactly `registry.devices()`, each filter keeps exactly the devices it names,
`next` and `total` say where to go on and how many match, and bad parameters get a one-line 400."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeops.cli import cli
from edgeops.fleet import client, drift, registry
from edgeops.fleet.api import ApiServer
from edgeops.fleet.home import enroll_device, init_fleet

sys.path.insert(0, str(Path(__file__).parent))
from test_scale import _fleet  # noqa: E402  (60 devices: one failed, one drifting, telemetry)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    path = tmp_path_factory.mktemp("pages")
    db, ids = _fleet(path, registry.LISTED + 10)
    registry.record_reports(db, [(d, {"online": False}) for d in ids[::7]])
    return db


def _all_pages(db, limit: int, **filters) -> tuple[list[dict], set[int]]:
    found, totals, after = [], set(), ""
    while after is not None:
        page = registry.page(db, after, limit, **filters)
        assert len(page["devices"]) <= limit and (page["next"] is None or page["next"] == page["devices"][-1]["id"])
        found += page["devices"]
        totals.add(page["total"])
        after = page["next"]
    return found, totals


def _words(d: dict) -> str:
    """What a filter term is matched against (as the dashboard used to match it in the browser)."""
    return " ".join([d["id"], d["profile"], *(f"{k}={v}" for k, v in d["labels"].items()),
                     d["execution"]["state"] if d["execution"] else "", d["installed_version"] or ""]).lower()


def test_paging_through_gives_every_device_once_in_id_order(fleet):
    every = registry.devices(fleet)
    for limit in (1, 7, len(every), registry.MAX_PAGE):
        found, totals = _all_pages(fleet, limit)
        assert found == every and totals == {len(every)}


@pytest.mark.parametrize("filters", [{"online": False}, {"online": True}, {"state": "failed"}, {"state": "none"},
                                     {"terms": ("S1",)}, {"terms": ("site=s2", "rpi4")}, {"terms": ("active", "dev-003")},
                                     {"online": True, "state": "active", "terms": ("x86",)}])
def test_each_filter_keeps_exactly_the_devices_it_names(fleet, filters):
    def kept(d: dict) -> bool:
        return (filters.get("online") in (None, d["online"])
                and filters.get("state") in (None, d["execution"]["state"] if d["execution"] else "none")
                and all(term.lower() in _words(d) for term in filters.get("terms", ())))

    expected = [d for d in registry.devices(fleet) if kept(d)]
    found, totals = _all_pages(fleet, 5, **filters)
    assert found == expected and totals == {len(expected)}


def test_drift_by_default_lists_only_devices_that_drift_and_counts_all(fleet):
    (version,) = drift.report(fleet)["versions"]
    summary = drift.drifting_only(version)
    assert summary["devices"] == {name: d for name, d in version["devices"].items() if d["status"] != "ok"}
    assert summary["devices"] and sum(summary["device_statuses"].values()) == len(version["devices"])
    assert {k: v for k, v in summary.items() if k not in ("devices", "device_statuses")} == \
        {k: v for k, v in version.items() if k != "devices"}
    assert drift.report(fleet, every_device=False)["versions"] == [summary]  # the kept copy
    fleet.execute("delete from derived_blobs where name = 'drift.summary'")  # as kept by an older edgeops
    assert drift.report(fleet, "m", every_device=False)["versions"] == [summary]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    path = tmp_path_factory.mktemp("api")
    home = init_fleet(path / "fleet")
    for i in range(5):
        enroll_device(home, f"dev-{i}", "rpi4" if i % 2 else "x86-vnni", {"site": f"s{i % 2}"}, path / f"dev-{i}")
    server = ApiServer(home, "127.0.0.1:0").start()
    yield server
    server.stop()


def _get(server: ApiServer, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def test_the_api_pages_with_next_and_total(api):
    assert _get(api, "/v1/devices?limit=2") == (200, {"devices": _get(api, "/v1/devices")[1]["devices"][:2],
                                                       "next": "dev-1", "total": 5})
    status, last = _get(api, "/v1/devices?limit=2&after=dev-3")
    assert status == 200 and [d["id"] for d in last["devices"]] == ["dev-4"] and last["next"] is None
    status, lab = _get(api, "/v1/devices?q=site%3Ds1&online=false&state=none")
    assert [d["id"] for d in lab["devices"]] == ["dev-1", "dev-3"] and lab["total"] == 2 and lab["next"] is None
    assert [d["id"] for d in client.devices(api.url, None, page=2)] == [f"dev-{i}" for i in range(5)]
    assert [d["id"] for d in client.devices(api.url, None, q="rpi4")] == ["dev-1", "dev-3"]


@pytest.mark.parametrize("query", ["limit=0", f"limit={registry.MAX_PAGE + 1}", "limit=ten", "limit=", "online=yes",
                                   "state=happy", f"after={'x' * 201}", f"q={'x' * 201}"])
def test_bad_paging_parameters_get_a_one_line_400(api, query):
    status, answer = _get(api, f"/v1/devices?{query}")
    assert status == 400 and list(answer) == ["error"] and "\n" not in answer["error"]


def test_bad_drift_devices_parameter_gets_a_400(api):
    status, answer = _get(api, "/v1/drift?devices=some")
    assert status == 400 and answer == {"error": "query.devices: Input should be 'drifting' or 'all'"}


@pytest.mark.parametrize("where", ["url", "dir"])
def test_device_list_reads_every_page_or_stops_at_limit(api, where):
    fleet = api.url if where == "url" else str(api.fleet.home.path)

    def listed(*options: str) -> list[str]:
        result = CliRunner().invoke(cli, ["device", "list", "--fleet", fleet, "--json", *options])
        assert result.exit_code == 0, result.output
        return [d["id"] for d in json.loads(result.output)]

    assert listed() == [f"dev-{i}" for i in range(5)]
    assert listed("--limit", "2") == ["dev-0", "dev-1"]
    assert listed("--offline", "--state", "none", "--filter", "RPI4 site=s1") == ["dev-1", "dev-3"]
    assert listed("--online") == []
    table = CliRunner().invoke(cli, ["device", "list", "--fleet", fleet, "--filter", "dev-4"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "dev-4" in table.output and "dev-3" not in table.output
    bad = CliRunner().invoke(cli, ["device", "list", "--fleet", fleet, "--state", "happy"])
    assert bad.exit_code == 2 and "Invalid value for '--state'" in bad.output
