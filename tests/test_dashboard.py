"""The web dashboard in a real headless Chromium (the system's, driven by Playwright) against a live
fleet: its Mosquitto (mutual TLS with the fleet CA), a FleetServer running the rollout engine, the
HTTP API served as `fleet serve` serves it (HTTPS with the fleet CA's certificate pki/api.pem) with
reads closed, and three real agents serving the digits MLP. Version 1.0.0 went out to every lab
device and completed; 1.1.0 is running, its one canary baking for an hour. The agents answered real
inferences on both versions. Operators: vera (viewer), otto (operator), rita (viewer, revoked in a
test), and fleet-admin (api_token).

Chromium trusts the API's certificate by its public key (--ignore-certificate-errors-spki-list),
not by any certificate error being ignored; Python checks that the certificate served chains to the
fleet CA. The page shows nothing but the login form until a token is accepted; then it must show
what the API says (devices, rollouts, series, the audit log, one device's page), offer rollout
actions to operators and admins and never to viewers, perform them as the operator signed in (the
audit log names them), render text from the API as text, and load nothing from anywhere but the
fleet. Screenshots go to test-artifacts/."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edgeops.agent.service import Agent
from edgeops.fleet import operators, registry
from edgeops.fleet.api import ApiServer, serve_options
from edgeops.fleet.dashboard import STATIC, asset
from edgeops.fleet.home import enroll_device, push
from edgeops.fleet.plan import make_plan
from edgeops.fleet.server import FleetServer
from fleetkit import new_fleet, secured_mosquitto, wait_for
from realparts import missing

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
OPERATORS = {"vera": "viewer", "otto": "operator", "rita": "viewer"}
LAB = {"dev-a": {"site": "lab", "ring": "canary"}, "dev-b": {"site": "lab"}, "dev-c": {"site": "lab"}}
SHELF = ("shelf-1", "rpi4", {"site": "depot", "note": "<img src=x onerror=window.pwned=1>"})  # never runs
CALLS = 30  # inferences per agent on each version it runs
STATES_ACTIONS = {"running": {"pause", "abort", "rollback"}, "paused": {"resume", "abort", "rollback"},
                  "completed": {"rollback"}, "aborted": {"rollback"}, "superseded": {"rollback"}}
DEADLINE_S = 20  # for the page to catch up with the API; it refreshes every 2 s
REFUSED = "Failed to load resource: the server responded with a status of 4"  # Chromium's note on a 4xx the page handles


def test_assets_are_the_static_files_and_nothing_else():
    assert asset("/") == ("text/html; charset=utf-8", (STATIC / "index.html").read_bytes())
    assert asset("/ui/app.js")[0] == "text/javascript; charset=utf-8"
    assert asset("/ui/style.css")[0] == "text/css; charset=utf-8"
    for path in ("/ui/../dashboard.py", "/ui/%2e%2e/api.py", "/ui/", "/ui/.hidden.js", "/ui/missing.js",
                 "/ui/static/app.js", "/index.html", "/ui/app.js/", "//ui/app.js"):
        assert asset(path) is None, path
    assert asset("/ui/" + "../" * 8 + "etc/passwd") is None


def get(url: str, path: str, token: str, context: ssl.SSLContext) -> dict:
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10, context=context) as answer:
        return json.load(answer)


def spki_sha256(cert_pem: bytes) -> str:
    """What Chromium's --ignore-certificate-errors-spki-list takes: base64 of the SHA-256 of the public key."""
    public = x509.load_pem_x509_certificate(cert_pem).public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        missing("chromium is not installed (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser(fleet):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        missing(f"playwright is not installed ({exc}; pip install playwright)")
    executable = chromium()  # the system's: Playwright never downloads a browser here
    with sync_playwright() as playwright:
        # the API's certificate is accepted for its key alone: any other certificate is an error
        browser = playwright.chromium.launch(executable_path=executable,
                                             args=[f"--ignore-certificate-errors-spki-list={fleet.spki}"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def fleet(slot_releases, digits_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    home = new_fleet(root)
    broker = secured_mosquitto(home)
    db = registry.open_db(home.db_path)
    tokens = {name: operators.add(db, name, role) for name, role in OPERATORS.items()}
    tokens["fleet-admin"] = home.config["api_token"]
    quiet = {"metrics_interval_s": 3600, "drift_window": 20}
    for device_id, labels in LAB.items():
        enroll_device(home, device_id, "x86-vnni", labels, root / device_id, agent=quiet)
    enroll_device(home, SHELF[0], SHELF[1], SHELF[2], root / SHELF[0])
    server = FleetServer(home, home.broker_url).start()
    api = ApiServer(home, "127.0.0.1:0", **serve_options(home, {"open_reads": False})).start()  # as `fleet serve`
    pinned = ssl.create_default_context(cafile=str(home.pki / "ca.pem"))  # the fleet CA and nothing else

    def read(path: str) -> dict:
        return get(api.url, path, tokens["fleet-admin"], pinned)
    stop = threading.Event()
    agents = [Agent(root / device_id) for device_id in LAB]
    threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in agents]
    for thread in threads:
        thread.start()
    pixels = np.load(digits_model.eval)["pixels"]
    try:
        v1 = push(home, [slot_releases.v1], {"site": "lab"}, plan=make_plan(stages="100%", bake=0, min_calls=0))
        wait_for(lambda: read(f"/v1/rollouts/{v1}")["state"] == "completed", "1.0.0 to complete")
        serve(agents, pixels)
        v2 = push(home, [slot_releases.v2], {"site": "lab"}, plan=make_plan(stages="1dev,100%", bake="1h", min_calls=0))
        canary = wait_for(lambda: next((a for a in agents if (a.installed() or {}).get("version") == "1.1.0"), None),
                          "a canary to run 1.1.0")
        serve([canary], pixels)
        model = read(f"/v1/rollouts/{v2}")["model"]
        wait_for(lambda: calls(read, model) == {"1.0.0": CALLS * len(agents), "1.1.0": CALLS},
                 "every inference to reach the fleet")
        wait_for(lambda: read(f"/v1/rollouts/{v2}")["stages"][0]["active"] == 1, "the canary to count as active")
        yield SimpleNamespace(url=api.url, get=read, tokens=tokens, token=tokens["fleet-admin"], v1=v1, v2=v2,
                              model=model, canary=canary.config.id, home=home, db=db, pinned=pinned,
                              spki=spki_sha256((home.pki / "api.pem").read_bytes()))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        api.stop()
        server.stop()
        broker.stop()


def serve(agents: list[Agent], pixels: np.ndarray) -> None:
    for agent in agents:
        for i in range(CALLS):
            agent.infer({"pixels": pixels[i : i + 1]})


def calls(read, model: str) -> dict[str, int]:
    series = read(f"/v1/series?model={model}&bucket=3600")
    return {v["version"]: sum(p["calls"] for p in v["points"]) for v in series["versions"]}


@pytest.fixture
def page(browser, fleet):
    """A fresh tab (own sessionStorage) that records every request and every error the page makes."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    requests, errors = [], []
    tab.on("request", lambda request: requests.append(request.url))
    tab.on("console", lambda message: message.type == "error" and not message.text.startswith(REFUSED)
           and errors.append(message.text))
    tab.on("pageerror", lambda error: errors.append(str(error)))
    yield tab
    context.close()
    assert errors == []
    foreign = [u for u in requests if not u.startswith(fleet.url + "/") and not u.startswith("data:")]
    assert foreign == [], "the dashboard loads only from the fleet"


def eventually(shown, expected, what: str):
    """Once the page shows what the API says (both read again each round), within DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        seen, want = shown(), expected()
        if seen == want or time.monotonic() > deadline:
            assert seen == want, what
            return seen
        time.sleep(0.2)


def open_dashboard(page, fleet, who: str = "vera", fragment: str = "/") -> None:
    """Open the page and sign in as operator `who` through the login form (reads are closed)."""
    page.goto(f"{fleet.url}/#{fragment}")
    page.get_by_test_id("sign-in").wait_for(timeout=DEADLINE_S * 1000)
    page.get_by_test_id("token-input").fill(fleet.tokens[who])
    page.get_by_test_id("token-input").press("Enter")
    page.get_by_test_id("updated").filter(has_text="updated").wait_for(timeout=DEADLINE_S * 1000)
    assert page.get_by_test_id("operator-name").text_content() == who


SHOWN_AUDIT = """() => [...document.querySelectorAll('[data-testid=audit-entry]')].map(tr =>
  ['actor', 'action', 'object', 'result'].map(id => tr.querySelector(`[data-testid=${id}]`).textContent))"""


def api_audit(fleet) -> list[list[str]]:
    return [[e["actor"], e["action"], e["object"], e["result"]] for e in fleet.get("/v1/audit?limit=20")["entries"]]


SHOWN_DEVICES = """() => [...document.querySelectorAll('#device-rows tr')].map(tr => {
  const cell = (id) => tr.querySelector(`[data-testid=${id}]`).textContent;
  return {row: tr.dataset.testid, id: cell('device-link'), profile: cell('profile'), online: cell('online'),
          installed: cell('installed'), execution: cell('execution'),
          labels: [...tr.querySelectorAll('[data-testid=labels] .chip')].map(c => c.textContent)};
})"""

SHOWN_ROLLOUTS = """() => [...document.querySelectorAll('article[data-testid^=rollout-]')].map(card => {
  const text = (el) => el.textContent;
  const all = (selector) => [...card.querySelectorAll(selector)];
  return {card: card.dataset.testid, release: text(card.querySelector('[data-testid=release]')),
          state: text(card.querySelector('[data-testid=state]')),
          next: text(card.querySelector('[data-testid=next]')).replace(/[0-9]+/g, 'N'),
          stages: all('[data-testid^=stage-] .numbers').map(text),
          counts: Object.fromEntries(all('[data-testid^=count-]').map(c => [c.dataset.testid.slice(6), c.innerText])),
          gates: all('tr[data-testid^=gate-]').map(tr => [...tr.cells].slice(0, 4).map(text)),
          decisions: all('[data-testid^=decision-]').map(li => [li.dataset.testid, li.querySelector('b').textContent]),
          actions: all('[data-testid^=action-]').map(b => b.textContent).sort()};
})"""

SHOWN_CHARTS = """(model) => {
  const box = document.querySelector(`[data-testid="charts-${model}"]`);
  if (!box) return null;
  return {legend: [...box.querySelectorAll('.legend li')].map(li => li.textContent),
          charts: Object.fromEntries([...box.querySelectorAll('figure')].map(f => [f.dataset.testid,
            Object.fromEntries([...f.querySelectorAll('g[data-version]')].map(g =>
              [g.dataset.version, g.querySelectorAll('circle').length]))]))};
}"""


def api_devices(fleet) -> list[dict]:
    return [{"row": f"device-{d['id']}", "id": d["id"], "profile": d["profile"],
             "online": "online" if d["online"] else "offline",
             "installed": f"{d['installed_model']} {d['installed_version']}" if d["installed_version"] else "-",
             "execution": f"r{d['execution']['release_id']} {d['execution']['state']}" if d["execution"] else "-",
             "labels": [f"{k}={v}" for k, v in d["labels"].items()]}
            for d in fleet.get("/v1/devices")["devices"]]


def api_rollouts(fleet, operator: bool = False) -> list[dict]:
    found = []
    for r in fleet.get("/v1/rollouts")["rollouts"]:
        decisions = fleet.get(f"/v1/rollouts/{r['id']}")["decisions"][:5]
        found.append({
            "card": f"rollout-{r['id']}", "release": f"{r['model']} {r['version']}", "state": r["state"],
            "next": "next: " + re.sub(r"[0-9]+", "N", r["next"]),
            "stages": [f"{s['active']}/{s['target']} active, {s['assigned']} assigned"
                       + (f", {s['failed']} failed" if s["failed"] else "") for s in r["stages"]],
            "counts": {state: f"{n} {state}" for state, n in r["counts"].items()},
            "gates": [[g["name"], g["value"], g["threshold"], "waiting" if g["ok"] is None else "ok" if g["ok"] else "failing"]
                      for g in r["gates"]],
            "decisions": [[f"decision-{d['id']}", d["action"]] for d in decisions],
            "actions": sorted(STATES_ACTIONS.get(r["state"], ())) if operator else []})
    return found


def api_charts(fleet, bucket: int) -> dict:
    series = fleet.get(f"/v1/series?model={fleet.model}&bucket={bucket}")["versions"]
    return {"legend": [v["version"] for v in series],
            "charts": {f"chart-{key}": {v["version"]: sum(map(has, v["points"])) for v in series} for key, has in (
                ("p95_ms", lambda p: p["p95_ms"] is not None), ("error_rate", lambda p: p["error_rate"] is not None),
                ("drift_alarms", lambda p: p["drift_windows"] > 0))}}


def test_served_over_https_with_a_certificate_from_the_fleet_ca(fleet):
    host, port = fleet.url.removeprefix("https://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with fleet.pinned.wrap_socket(raw, server_hostname=host) as tls:  # verifies the chain to pki/ca.pem
            served = tls.getpeercert(binary_form=True)
    issued = x509.load_pem_x509_certificate((fleet.home.pki / "api.pem").read_bytes())
    assert served == issued.public_bytes(serialization.Encoding.DER)
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):  # no system CA vouches for it
        urllib.request.urlopen(fleet.url + "/v1/health", timeout=10, context=ssl.create_default_context())
    with pytest.raises(OSError):  # and it speaks nothing but TLS: a plain request is dropped
        urllib.request.urlopen(fleet.url.replace("https://", "http://") + "/v1/health", timeout=10)


def test_signed_out_the_page_shows_only_the_login(page, fleet):
    page.goto(f"{fleet.url}/#/")
    page.get_by_test_id("sign-in").wait_for(timeout=DEADLINE_S * 1000)
    assert page.get_by_test_id("mode").text_content() == "signed out"
    assert page.get_by_test_id("overview").is_hidden() and page.locator("#device-rows tr").count() == 0
    page.get_by_test_id("token-input").fill("not-a-token")
    page.get_by_test_id("token-input").press("Enter")
    page.get_by_test_id("notice").filter(has_text="wrong token").wait_for(timeout=DEADLINE_S * 1000)
    assert page.get_by_test_id("mode").text_content() == "signed out"
    assert page.evaluate("sessionStorage.getItem('edgeops.token')") is None  # a refused token is not kept
    assert page.get_by_test_id("overview").is_hidden()


def test_overview_shows_what_the_api_says_to_a_viewer(page, fleet):
    open_dashboard(page, fleet, "vera")
    shown = eventually(lambda: page.evaluate(SHOWN_DEVICES), lambda: api_devices(fleet), "device rows = GET /v1/devices")
    assert {d["id"] for d in shown} == {*LAB, SHELF[0]}
    assert {d["installed"].split()[-1] for d in shown if d["id"] in LAB} == {"1.0.0", "1.1.0"}
    rollouts = eventually(lambda: page.evaluate(SHOWN_ROLLOUTS), lambda: api_rollouts(fleet),
                          "rollout cards = GET /v1/rollouts")
    assert [r["state"] for r in rollouts] == ["running", "completed"]
    assert rollouts[0]["stages"][0].startswith("1/1 active") and rollouts[1]["counts"]["active"] == "3 active"
    for bucket in (60, 10):
        page.get_by_test_id("bucket").select_option(str(bucket))
        charts = eventually(lambda: page.evaluate(SHOWN_CHARTS, fleet.model), lambda: api_charts(fleet, bucket),
                            f"one line per version = GET /v1/series?bucket={bucket}")
        assert charts["legend"] == ["1.0.0", "1.1.0"] and all(charts["charts"]["chart-p95_ms"].values())

    assert page.get_by_test_id("mode").text_content() == "viewer"
    assert page.locator("button[data-testid^=action-]").count() == 0  # a viewer is offered no action
    audit = eventually(lambda: page.evaluate(SHOWN_AUDIT), lambda: api_audit(fleet), "the audit panel = GET /v1/audit")
    assert page.get_by_test_id("audit").is_visible() and ["engine", "complete", f"rollout {fleet.v1}", "ok"] in audit
    # a label is text, however much it looks like HTML
    assert page.get_by_test_id(f"device-{SHELF[0]}").get_by_text(f"note={SHELF[2]['note']}").count() == 1
    assert page.locator("img").count() == 0 and page.evaluate("window.pwned") is None
    for path in ("/ui/..%2fapi.py", "/ui/%2e%2e%2f%2e%2e%2ffleet%2ffleet.json", "/ui/dashboard.py"):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(fleet.url + path, timeout=10, context=fleet.pinned)
        assert refused.value.code == 404, path


def test_filter_narrows_the_device_table(page, fleet):
    open_dashboard(page, fleet)
    page.locator("#device-rows tr").nth(len(LAB)).wait_for()

    def shows(rows: set[str], count: str | None = None) -> None:
        """The server filters (GET /v1/devices?q=...&online=...), so the table follows a moment later."""
        eventually(lambda: (set(page.evaluate("() => [...document.querySelectorAll('#device-rows tr')]"
                                              ".map(tr => tr.dataset.testid)")),
                            page.get_by_test_id("device-count").text_content() if count else None),
                   lambda: (rows, count), f"device rows {rows}")

    shows({f"device-{d}" for d in (*LAB, SHELF[0])}, f"{len(LAB) + 1} of {len(LAB) + 1}")
    page.get_by_test_id("device-filter").fill("canary")
    shows({"device-dev-a"})
    page.get_by_test_id("device-filter").fill(fleet.canary)
    shows({f"device-{fleet.canary}"})
    page.get_by_test_id("device-filter").fill("site=lab x86")
    shows({f"device-{d}" for d in LAB})
    page.get_by_test_id("device-filter").fill("")
    page.get_by_test_id("online-filter").select_option("offline")
    shows({f"device-{SHELF[0]}"}, f"1 of {len(LAB) + 1}")
    page.get_by_test_id("online-filter").select_option("online")
    page.get_by_test_id("device-filter").fill("rpi4")
    shows(set(), f"0 of {len(LAB) + 1}")
    assert page.get_by_test_id("more-devices").is_hidden()


def test_device_page_shows_the_device(page, fleet):
    open_dashboard(page, fleet)
    page.get_by_test_id(f"device-{fleet.canary}").get_by_test_id("device-link").click()
    detail = page.get_by_test_id(f"device-detail-{fleet.canary}")
    detail.wait_for(timeout=DEADLINE_S * 1000)
    assert page.url.endswith(f"#/devices/{fleet.canary}")
    releases = {r["id"]: f"r{r['id']} {r['model']} {r['version']}" for r in fleet.get("/v1/releases")["releases"]}

    def shown() -> dict:
        return {"profile": detail.get_by_test_id("field-profile").text_content(),
                "labels": detail.get_by_test_id("field-labels").locator(".chip").all_text_contents(),
                "installed": detail.get_by_test_id("field-installed").text_content(),
                "history": [row.locator("td").all_text_contents()[:2] for row in detail.locator("tr[data-testid^=history-]").all()],
                "calls": detail.get_by_test_id("field-calls").text_content()}

    def expected() -> dict:
        d = fleet.get(f"/v1/devices/{fleet.canary}")
        return {"profile": d["profile"], "labels": [f"{k}={v}" for k, v in d["labels"].items()],
                "installed": f"{d['installed_model']} {d['installed_version']} ({d['installed_target']}, slot {d['slot']})",
                "history": [[releases[x["release_id"]], x["state"]] for x in d["history"]],
                "calls": str(d["telemetry"]["inferences"])}

    seen = eventually(shown, expected, "the device page = GET /v1/devices/ID")
    assert [h[0] for h in seen["history"]] == [releases[fleet.v2], releases[fleet.v1]]
    assert detail.get_by_test_id("device-id").text_content() == fleet.canary
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard-device.png"), full_page=True)

    page.goto(f"{fleet.url}/#/devices/no-such-device")  # the token stays for the tab (sessionStorage)
    page.get_by_test_id("device-missing").wait_for(timeout=DEADLINE_S * 1000)


def test_an_operator_pauses_a_rollout_and_the_audit_log_names_them(page, fleet):
    open_dashboard(page, fleet, "otto")
    assert page.get_by_test_id("mode").text_content() == "operator"
    assert page.get_by_test_id("token-form").is_hidden() and page.get_by_test_id("forget-token").is_visible()
    eventually(lambda: page.evaluate(SHOWN_ROLLOUTS), lambda: api_rollouts(fleet, operator=True),
               "each rollout's actions, as its state allows")

    running = page.get_by_test_id(f"rollout-{fleet.v2}")
    running.get_by_test_id("action-pause").click()
    wait_for(lambda: fleet.get(f"/v1/rollouts/{fleet.v2}")["state"] == "paused", "the pause to reach the fleet",
             DEADLINE_S)
    running.get_by_test_id("action-resume").wait_for(timeout=DEADLINE_S * 1000)
    assert running.get_by_test_id("state").text_content() == "paused"
    decision = fleet.get(f"/v1/rollouts/{fleet.v2}")["decisions"][0]
    assert (decision["actor"], decision["action"]) == ("operator", "pause")
    running.get_by_test_id(f"decision-{decision['id']}").wait_for(timeout=DEADLINE_S * 1000)
    paused = ["otto", "rollout pause", f"rollout {fleet.v2}", "ok"]
    assert api_audit(fleet)[0] == paused  # the fleet's audit log names the operator signed in
    audit = eventually(lambda: page.evaluate(SHOWN_AUDIT)[:1], lambda: api_audit(fleet)[:1], "the pause in the audit panel")
    assert audit == [paused]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
    running.get_by_test_id("action-resume").click()
    running.get_by_test_id("action-pause").wait_for(timeout=DEADLINE_S * 1000)
    assert fleet.get(f"/v1/rollouts/{fleet.v2}")["state"] == "running"
    assert api_audit(fleet)[0] == ["otto", "rollout resume", f"rollout {fleet.v2}", "ok"]

    page.get_by_test_id("forget-token").click()
    page.get_by_test_id("sign-in").wait_for(timeout=DEADLINE_S * 1000)
    assert page.get_by_test_id("mode").text_content() == "signed out"
    assert page.locator("button[data-testid^=action-]").count() == 0  # at once, not at the next refresh
    assert page.evaluate("sessionStorage.getItem('edgeops.token')") is None


def test_a_token_in_the_address_signs_in_and_leaves_it(page, fleet):
    page.goto(f"{fleet.url}/#token={fleet.token}")
    page.get_by_test_id("updated").filter(has_text="updated").wait_for(timeout=DEADLINE_S * 1000)
    assert page.get_by_test_id("mode").text_content() == "admin"
    assert page.get_by_test_id("operator-name").text_content() == "fleet-admin"
    assert fleet.token not in page.url  # the token leaves the address bar and the history
    eventually(lambda: page.evaluate(SHOWN_ROLLOUTS), lambda: api_rollouts(fleet, operator=True), "an admin's actions")


def test_a_revoked_token_signs_the_page_out(page, fleet):
    open_dashboard(page, fleet, "rita")
    operators.revoke(fleet.db, "rita")
    page.get_by_test_id("notice").filter(has_text="signed out: the fleet refused the token").wait_for(
        timeout=DEADLINE_S * 1000)
    assert page.get_by_test_id("mode").text_content() == "signed out"
    assert page.get_by_test_id("overview").is_hidden()
