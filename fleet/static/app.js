/* The edgeops fleet dashboard: reads the fleet's GET API every REFRESH_MS while the tab is visible
   and renders it (the device table: the first page of GET /v1/devices, filtered by the server, so a
   large fleet is never fetched whole; the audit log: the latest AUDIT_SHOWN entries). An operator
   signs in with a token (the login form, or "#token=..."), which GET /v1/whoami checks before it
   is kept, in sessionStorage only, and sent with every request as "Authorization: Bearer <token>".
   Its role decides what the page offers: rollout actions for operators and admins, never for
   viewers; without a token, the page reads only where the server's reads are open.

   Invariants: text from the API reaches the page only as text nodes and attribute values, never as
   HTML; the page fetches only from the fleet that served it; a token the server refuses (wrong,
   revoked) is dropped at once; routes are "#/" and "#/devices/<id>". */
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "edgeops.token";
const BUCKET_KEY = "edgeops.bucket";
const STATES = ["queued", "downloading", "verifying", "installing", "self-test", "active",
                "failed", "rolled-back", "rejected", "timed-out", "cancelled"];
/* What fleet/rollout.py allows in each rollout state. */
const ACTIONS = {running: ["pause", "abort", "rollback"], paused: ["resume", "abort", "rollback"],
                 completed: ["rollback"], aborted: ["rollback"], superseded: ["rollback"]};
const CONFIRM = new Set(["abort", "rollback"]);
const FULL_CARDS = 6;
const DEVICE_PAGE = 100;  // rows the device table asks for at first, and more with each "show more"
const MAX_PAGE = 1000;  // the most GET /v1/devices answers in one page
const DECISIONS_SHOWN = 5;
const AUDIT_SHOWN = 20;
const ACTING_ROLES = new Set(["operator", "admin"]);  // fleet/operators.py: who may push and steer rollouts
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d"];
/* [series field, title, label format, whether a point has a value]: a bucket without calls has no
   latency or error rate, one without drift windows no alarm count (not zero alarms). */
const known = (key) => (p) => p[key] !== null && p[key] !== undefined;
const CHARTS = [["p95_ms", "p95 latency (ms)", (v) => v.toFixed(2), known("p95_ms")],
                ["error_rate", "error rate", (v) => (100 * v).toFixed(1) + "%", known("error_rate")],
                ["drift_alarms", "drift alarms", (v) => String(v), (p) => p.drift_windows > 0]];
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const rendered = {};  // section -> JSON of the data it was last rendered from
let status = null;  // the last GET /v1/status
let who = null;  // GET /v1/whoami for the token in use: {name, role, reads_open}
let releases = new Map();
let deviceLimit = DEVICE_PAGE;
let timer = null;
let busy = false;
let again = false;

/* ---------- DOM building: text only ---------- */

function build(ns, tag, attrs, children) {
  const el = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined && child !== false) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}
const h = (tag, attrs, ...children) => build(null, tag, attrs, children);
const s = (tag, attrs, ...children) => build(SVG, tag, attrs, children);

function badge(text, kind, testid) {
  return h("span", {class: `badge ${kind}`, "data-testid": testid}, text);
}

function labelChips(labels) {
  return Object.entries(labels || {}).map(([k, v]) => h("span", {class: "chip"}, `${k}=${v}`));
}

/* The time of day, with the date when it is not from the last day. */
function clock(t) {
  if (!t) return "-";
  const date = new Date(t * 1000);
  return Date.now() - date < 86400000 ? date.toLocaleTimeString() : date.toLocaleString();
}

function ago(t) {
  if (!t) return "never";
  const seconds = Math.max(0, Date.now() / 1000 - t);
  return seconds < 120 ? `${seconds.toFixed(0)}s ago` : seconds < 7200 ? `${(seconds / 60).toFixed(0)}m ago`
    : `${(seconds / 3600).toFixed(0)}h ago`;
}

function dash(value) {
  const empty = value === null || value === undefined || value === "" || (Array.isArray(value) && !value.length);
  return empty ? "-" : value;
}

function releaseName(id) {
  const r = releases.get(id);
  return r ? `r${id} ${r.model} ${r.version}` : `r${id}`;
}

function show(page) {
  $("overview").hidden = page !== "overview";
  $("device-page").hidden = page !== "device";
}

function message(id, text) {
  $(id).hidden = !text;
  $(id).textContent = text || "";
}

/* ---------- token, route, API ---------- */

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function mayAct() {
  return Boolean(who && ACTING_ROLES.has(who.role));
}

/* Ask the fleet who `value` belongs to and keep it only if the fleet knows it; without one (or
   when it is refused), learn whether reads are open. Empty `value`: sign out. */
async function signIn(value) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (value) {
    try {
      const answer = await api("/v1/whoami", {headers: {"Authorization": `Bearer ${value}`}});
      sessionStorage.setItem(TOKEN_KEY, value);
      message("notice", "");
      setWho(answer);
      return;
    } catch (error) {
      message("notice", error.status === 401 ? `sign-in refused: ${error.message}` : `cannot sign in: ${error.message}`);
    }
  }
  try {
    const anonymous = await api("/v1/whoami");
    setWho({name: null, role: null, reads_open: anonymous.reads_open});
  } catch (error) {
    message("error", `cannot read the fleet API: ${error.message}`);
    setWho(null);
  }
}

function setWho(answer) {
  who = answer;
  const role = who && who.role;
  $("mode").textContent = role || (who && who.reads_open ? "read-only" : "signed out");
  $("mode").className = `badge ${role ? `role-${role}` : "read-only"}`;
  $("operator-name").textContent = role ? who.name : "";
  $("forget-token").hidden = !role;
  $("token-form").hidden = Boolean(role);
  $("sign-in").hidden = Boolean(role) || Boolean(who && who.reads_open);
  if (who && !role && !who.reads_open) show("none");  // signed out of a closed fleet: nothing stays in view
  drawRolloutsIfChanged();
}

/* The token was refused on a read (revoked meanwhile): forget it, and say so. */
function tokenRefused(error) {
  sessionStorage.removeItem(TOKEN_KEY);
  setWho(who && {name: null, role: null, reads_open: who.reads_open});
  message("notice", `signed out: the fleet refused the token (${error.message})`);
}

/* "#token=abc" or "#/devices/x?token=abc": sign in with the token, drop it from the address bar and history. */
async function takeTokenFromHash() {
  const match = location.hash.match(/[#?&]token=([^&]*)/);
  if (!match) return;
  let value = null;
  try {
    value = decodeURIComponent(match[1]);
  } catch {
    message("notice", "the token in the address is not valid URL encoding");
  }
  const rest = (location.hash.slice(0, match.index) + location.hash.slice(match.index + match[0].length)).replace(/^#/, "");
  history.replaceState(null, "", `${location.pathname}${location.search}#${rest || "/"}`);
  if (value !== null) await signIn(value);
}

function route() {
  const path = location.hash.replace(/^#/, "").split(/[?&]/)[0];
  const match = path.match(/^\/devices\/(.+)$/);
  if (match) {
    try {
      return {page: "device", id: decodeURIComponent(match[1])};
    } catch { /* not valid URL encoding: the overview */ }
  }
  return {page: "overview"};
}

async function api(path, options) {
  const sent = {...options, headers: {...(token() ? {"Authorization": `Bearer ${token()}`} : {}), ...(options || {}).headers}};
  const response = await fetch(path, {cache: "no-store", ...sent});
  let body = null;
  try {
    body = await response.json();
  } catch { /* not JSON: the status line says enough */ }
  if (!response.ok) {
    const error = new Error((body && body.error) || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

async function act(id, action) {
  if (CONFIRM.has(action) && !confirm(`${action} rollout #${id}?`)) return;
  try {
    await api(`/v1/rollouts/${encodeURIComponent(id)}/${action}`, {
      method: "POST", body: "{}", headers: {"Content-Type": "application/json"},
    });
    message("notice", `${action}: done for rollout #${id}`);
  } catch (error) {
    message("notice", `${action} rollout #${id} refused: ${error.message}`);
  }
  refresh();
}

/* ---------- refresh loop ---------- */

async function refresh() {
  clearTimeout(timer);
  if (busy) {
    again = true;
    return;
  }
  busy = true;
  try {
    if (who && !who.role && !who.reads_open) {  // nothing to read without a token: the login form only
      show("none");
      $("updated").textContent = "sign in to see the fleet";
      return;
    }
    const where = route();
    if (where.page === "device") await renderDevicePage(where.id);
    else await renderOverview();
    show(where.page);
    message("error", "");
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    if (error.status === 401 && token()) tokenRefused(error);
    else message("error", `cannot read the fleet API: ${error.message} (showing the last data)`);
  } finally {
    busy = false;
    if (again) {
      again = false;
      timer = setTimeout(refresh, 0);
    } else if (!document.hidden) {
      timer = setTimeout(refresh, REFRESH_MS);
    }
  }
}

/* Render `section` with `draw(data)` only when its data changed: keeps focus, hover and clicks steady. */
function renderChanged(section, data, draw) {
  const json = JSON.stringify(data);
  if (rendered[section] === json) return;
  rendered[section] = json;
  draw(data);
}

/* ---------- overview ---------- */

async function renderOverview() {
  const [fresh, devices, audit] = await Promise.all([api("/v1/status"), api(devicesPath()),
                                                     api(`/v1/audit?limit=${AUDIT_SHOWN}`)]);
  const models = [...new Set([...fresh.rollouts, ...fresh.releases].map((r) => r.model))].sort();
  const bucket = $("bucket").value;
  const series = await Promise.all(models.map((model) =>
    api(`/v1/series?model=${encodeURIComponent(model)}&bucket=${bucket}`)
      .then((answer) => ({model, versions: answer.versions}), (error) => ({model, error: error.message}))));
  status = fresh;
  releases = new Map(status.releases.map((r) => [r.id, r]));
  drawRolloutsIfChanged();
  renderChanged("attention", {attention: status.attention, drift: status.drift}, drawAttention);
  renderChanged("charts", series, drawCharts);
  renderChanged("devices", {devices, all: status.device_counts.total, releases: status.releases.map((r) => r.id)},
                drawDevices);
  renderChanged("audit", audit.entries, drawAudit);
}

/* Also called when the token comes or goes, so the action buttons follow at once. */
function drawRolloutsIfChanged() {
  if (!status) return;
  renderChanged("rollouts", {rollouts: status.rollouts, decisions: status.decisions, acting: mayAct()},
                drawRollouts);
}

function drawRollouts({rollouts, decisions}) {
  const cards = rollouts.slice(0, FULL_CARDS).map((r) =>
    rolloutCard(r, decisions.filter((d) => d.rollout === r.id).slice(0, DECISIONS_SHOWN)));
  const older = rollouts.slice(FULL_CARDS).map((r) =>
    h("tr", {"data-testid": `rollout-${r.id}`},
      h("td", {}, `#${r.id}`), h("td", {}, `${r.model} ${r.version}`),
      h("td", {}, badge(r.state, `state-${r.state}`, "state")), h("td", {}, clock(r.updated_at))));
  $("rollouts").replaceChildren(
    ...(cards.length ? cards : [h("p", {class: "muted"}, "No rollouts yet: push a release.")]),
    older.length ? h("table", {class: "older"}, h("caption", {}, "older rollouts"), h("tbody", {}, older)) : "");
}

function rolloutCard(r, decisions) {
  const selector = Object.entries(r.selector).map(([k, v]) => `${k}=${v}`).join(", ") || "all devices";
  return h("article", {class: "card rollout", "data-testid": `rollout-${r.id}`},
    h("header", {},
      h("h3", {}, `#${r.id} `, h("span", {"data-testid": "release"}, `${r.model} ${r.version}`)),
      badge(r.state, `state-${r.state}`, "state"),
      actionButtons(r)),
    h("p", {class: "muted"},
      `${selector} · ${r.targeted} targeted · profiles ${r.profiles.join(", ") || "-"} · plan ${r.plan.stages.join(" → ")}`
      + `, bake ${r.plan.bake_s}s, on failure ${r.plan.on_failure}`),
    h("p", {class: "next", "data-testid": "next"}, "next: ", r.next),
    h("div", {class: "stages"}, r.stages.map((stage, i) => stageBar(stage, i, i === r.stage))),
    h("div", {class: "counts"}, countChips(r.counts)),
    gateTable(r.gates),
    h("ol", {class: "decisions", "data-testid": "decisions"}, decisions.map((d) =>
      h("li", {"data-testid": `decision-${d.id}`},
        h("time", {}, clock(d.t)), " ", h("b", {}, d.action), ` by ${d.actor}: `, d.reason))));
}

function actionButtons(r) {
  if (!mayAct()) return null;
  return h("span", {class: "actions"}, (ACTIONS[r.state] || []).map((action) =>
    h("button", {type: "button", class: `action ${action}`, "data-testid": `action-${action}`,
                 onclick: () => act(r.id, action)}, action)));
}

function stageBar(stage, i, current) {
  const share = (n) => `${stage.target ? Math.min(100, (100 * n) / stage.target) : 0}%`;
  const assigned = h("div", {class: "assigned"});
  const active = h("div", {class: "active"});
  assigned.style.width = share(stage.assigned);
  active.style.width = share(stage.active);
  return h("div", {class: `stage${current ? " current" : ""}${stage.done ? " done" : ""}`, "data-testid": `stage-${i}`,
                   "data-active": stage.active, "data-target": stage.target},
    h("span", {class: "label"}, stage.label),
    h("div", {class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": stage.target,
              "aria-valuenow": stage.active}, assigned, active),
    h("span", {class: "numbers"}, `${stage.active}/${stage.target} active, ${stage.assigned} assigned`,
      stage.failed ? h("span", {class: "failed"}, `, ${stage.failed} failed`) : ""));
}

function countChips(counts) {
  const states = [...STATES, ...Object.keys(counts).filter((state) => !STATES.includes(state))];
  return states.map((state) => {
    const n = counts[state] || 0;
    return h("span", {class: `count${n ? "" : " zero"} state-${state}`, "data-testid": `count-${state}`, "data-count": n},
      h("b", {}, n), ` ${state}`);
  });
}

function gateTable(gates) {
  if (!gates.length) return "";
  return h("table", {class: "gates"},
    h("thead", {}, h("tr", {}, ["gate", "value", "threshold", "verdict", "detail"].map((t) => h("th", {}, t)))),
    h("tbody", {}, gates.map((g) => {
      const verdict = g.ok === null ? "waiting" : g.ok ? "ok" : "failing";
      return h("tr", {class: `gate ${verdict}`, "data-testid": `gate-${g.name.replace(/\W+/g, "-")}`,
                      "data-verdict": verdict},
        h("td", {}, g.name), h("td", {}, g.value), h("td", {}, g.threshold),
        h("td", {}, badge(verdict, `verdict-${verdict}`, "verdict")), h("td", {class: "muted"}, g.detail));
    })));
}

function drawAttention({attention, drift}) {
  $("attention-section").hidden = !attention.length && !drift.length;
  $("attention").replaceChildren(
    ...drift.map((f) => h("li", {"data-testid": "drift"},
      badge(f.status, "drift", "drift-status"), ` ${f.model} ${f.version} on ${f.devices.join(", ")}`)),
    ...attention.map((a) => h("li", {"data-testid": `attention-${a.device}`},
      h("a", {href: `#/devices/${encodeURIComponent(a.device)}`}, a.device),
      a.rollout === null ? "" : ` (rollout #${a.rollout})`, `: ${a.reason}`)));
}

/* ---------- audit log: every change, who made it, its result ---------- */

function drawAudit(entries) {
  $("audit-rows").replaceChildren(...(entries.length ? entries.map((e, i) =>
    h("tr", {"data-testid": "audit-entry", "data-index": i, class: e.result === "ok" ? "" : "refused"},
      h("td", {}, h("time", {}, clock(e.t))), h("td", {"data-testid": "actor"}, e.actor),
      h("td", {"data-testid": "action"}, e.action), h("td", {"data-testid": "object"}, e.object),
      h("td", {"data-testid": "result"}, e.result), h("td", {class: "muted"}, e.detail)))
    : [h("tr", {}, h("td", {colspan: 6, class: "muted"}, "No changes recorded yet."))]));
}

/* ---------- devices ---------- */

/* The first page of devices matching the filter: the server filters, so a large fleet is never sent whole. */
function devicesPath() {
  const query = new URLSearchParams({limit: String(deviceLimit)});
  const terms = $("filter").value.trim().slice(0, 200);
  if (terms) query.set("q", terms);
  if ($("online").value) query.set("online", String($("online").value === "online"));
  return `/v1/devices?${query}`;
}

function drawDevices({devices, all}) {
  const more = devices.devices.length < devices.total;
  $("device-count").textContent = `${devices.total} of ${all}` + (more ? ` (first ${devices.devices.length} shown)` : "");
  $("device-rows").replaceChildren(...devices.devices.map(deviceRow));
  $("more-devices").hidden = !more || deviceLimit >= MAX_PAGE;
}

function filterDevices() {
  deviceLimit = DEVICE_PAGE;
  refresh();
}

function deviceRow(d) {
  const t = d.telemetry || {};
  const e = d.execution;
  return h("tr", {"data-testid": `device-${d.id}`, class: d.online ? "" : "offline"},
    h("td", {}, h("a", {href: `#/devices/${encodeURIComponent(d.id)}`, "data-testid": "device-link"}, d.id)),
    h("td", {"data-testid": "profile"}, d.profile),
    h("td", {"data-testid": "labels"}, labelChips(d.labels)),
    h("td", {}, badge(d.online ? "online" : "offline", d.online ? "online" : "offline", "online")),
    h("td", {"data-testid": "installed"}, d.installed_version ? `${d.installed_model} ${d.installed_version}` : "-"),
    h("td", {}, d.desired_release === null || d.desired_release === undefined ? "-" : releaseName(d.desired_release)),
    h("td", {"data-testid": "execution", title: e ? e.reason : ""}, e ? `r${e.release_id} ${e.state}` : "-"),
    h("td", {class: "num"}, dash(t.inferences)),
    h("td", {class: "num"}, dash(t.errors)),
    h("td", {class: "num"}, t.p95_ms === null || t.p95_ms === undefined ? "-" : t.p95_ms.toFixed(2)),
    h("td", {}, ago(d.last_seen)));
}

/* ---------- charts: one SVG per measure and model, one line per version ---------- */

function drawCharts(series) {
  $("charts").replaceChildren(...(series.length ? series.map(modelCharts)
                                                 : [h("p", {class: "muted"}, "No models pushed yet.")]));
}

function modelCharts({model, versions, error}) {
  const body = error ? [h("p", {class: "error"}, `cannot read the series: ${error}`)] : [
    h("ul", {class: "legend"}, versions.map((v, i) => {
      const swatch = h("span", {class: "swatch"});
      swatch.style.background = COLORS[i % COLORS.length];
      return h("li", {}, swatch, v.version);
    })),
    h("div", {class: "chart-row"}, CHARTS.map(([key, title, format, valued]) => chart(versions, key, title, format, valued))),
  ];
  return h("div", {class: "model-charts", "data-testid": `charts-${model}`}, h("h3", {}, model), body);
}

function chart(versions, key, title, format, valued) {
  const W = 360, H = 150, L = 48, R = 8, T = 8, B = 20;
  const points = versions.flatMap((v) => v.points.filter(valued));
  const figure = (...content) => h("figure", {class: "chart", "data-testid": `chart-${key}`}, h("figcaption", {}, title),
                                   ...content);
  if (!points.length) return figure(h("p", {class: "muted"}, "no data yet"));
  const t0 = Math.min(...points.map((p) => p.t));
  const t1 = Math.max(...points.map((p) => p.t));
  const top = Math.max(...points.map((p) => p[key])) || 1;
  const x = (t) => L + (t1 > t0 ? ((t - t0) / (t1 - t0)) * (W - L - R) : (W - L - R) / 2);
  const y = (v) => H - B - (v / top) * (H - T - B);
  const grid = [0, top / 2, top].map((v) => [
    s("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: "grid"}),
    s("text", {x: L - 4, y: y(v) + 4, "text-anchor": "end"}, format(v))]);
  const lines = versions.map((v, i) => {
    const color = COLORS[i % COLORS.length];
    const runs = [[]];  // a bucket without a value breaks the line
    for (const p of v.points) {
      if (valued(p)) runs[runs.length - 1].push(p);
      else if (runs[runs.length - 1].length) runs.push([]);
    }
    return s("g", {"data-version": v.version},
      runs.filter((run) => run.length > 1).map((run) =>
        s("polyline", {points: run.map((p) => `${x(p.t)},${y(p[key])}`).join(" "), stroke: color, fill: "none"})),
      v.points.filter(valued).map((p) => s("circle", {cx: x(p.t), cy: y(p[key]), r: points.length > 60 ? 1.5 : 2.5, fill: color},
        s("title", {}, `${v.version} at ${clock(p.t)}: ${format(p[key])} (${p.calls} calls)`))));
  });
  return figure(s("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title}, grid,
    s("text", {x: L, y: H - 4}, clock(t0)), s("text", {x: W - R, y: H - 4, "text-anchor": "end"}, clock(t1)), lines));
}

/* ---------- device page ---------- */

async function renderDevicePage(id) {
  let d;
  try {
    const [answer, listed] = await Promise.all([api(`/v1/devices/${encodeURIComponent(id)}`), api("/v1/releases")]);
    d = answer;
    releases = new Map(listed.releases.map((r) => [r.id, r]));
  } catch (error) {
    if (error.status !== 404) throw error;
    $("device-detail").replaceChildren(h("p", {class: "error", "data-testid": "device-missing"}, error.message));
    return;
  }
  const t = d.telemetry;
  const e = d.execution;
  const desired = d.desired ? `r${d.desired.release_id} ${d.desired.model} ${d.desired.version} (${d.desired.target})`
    : d.desired_release === null || d.desired_release === undefined ? "-" : releaseName(d.desired_release);
  $("device-detail").replaceChildren(h("article", {class: "card device", "data-testid": `device-detail-${d.id}`},
    h("h2", {}, h("span", {"data-testid": "device-id"}, d.id), " ",
      badge(d.online ? "online" : "offline", d.online ? "online" : "offline", "online")),
    fields([
      ["profile", d.profile],
      ["labels", labelChips(d.labels)],
      ["installed", d.installed_version ? `${d.installed_model} ${d.installed_version} (${d.installed_target}, slot ${d.slot})` : "-"],
      ["desired", desired],
      ["execution", e ? `${releaseName(e.release_id)} ${e.state}${e.reason ? `: ${e.reason}` : ""}` : "-"],
      ["enrolled", clock(d.enrolled_at)],
      ["last seen", ago(d.last_seen)],
    ]),
    h("h3", {}, "Telemetry"),
    t ? fields([
      ["received", t.received], ["dropped", t.dropped], ["calls", t.inferences], ["errors", t.errors],
      ["p95 ms", t.p95_ms === null ? "-" : t.p95_ms.toFixed(2)],
      ...Object.entries(t.metrics || {}).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : v]),
    ]) : h("p", {class: "muted"}, "No telemetry yet."),
    h("h3", {}, "Execution history"),
    h("table", {class: "history", "data-testid": "history"},
      h("thead", {}, h("tr", {}, ["release", "state", "reason", "updated"].map((c) => h("th", {}, c)))),
      h("tbody", {}, (d.history || []).map((x) => h("tr", {"data-testid": `history-${x.release_id}`},
        h("td", {}, releaseName(x.release_id)), h("td", {"data-testid": "state"}, x.state),
        h("td", {}, x.reason || ""), h("td", {}, clock(x.updated_at))))))));
}

function fields(rows) {
  return h("dl", {class: "fields"}, rows.map(([name, value]) =>
    [h("dt", {}, name), h("dd", {"data-testid": `field-${name.replace(/\W+/g, "-")}`}, dash(value))]));
}

/* ---------- start ---------- */

async function start() {
  $("bucket").value = sessionStorage.getItem(BUCKET_KEY) || "60";
  $("token-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = $("token-input").value.trim();
    $("token-input").value = "";
    await signIn(value);
    refresh();
  });
  $("forget-token").addEventListener("click", async () => {
    await signIn("");
    refresh();
  });
  $("filter").addEventListener("input", filterDevices);
  $("online").addEventListener("change", filterDevices);
  $("more-devices").addEventListener("click", () => {
    deviceLimit = Math.min(MAX_PAGE, deviceLimit + DEVICE_PAGE);
    refresh();
  });
  $("bucket").addEventListener("change", () => {
    sessionStorage.setItem(BUCKET_KEY, $("bucket").value);
    refresh();
  });
  window.addEventListener("hashchange", async () => {
    await takeTokenFromHash();
    refresh();
  });
  document.addEventListener("visibilitychange", () => (document.hidden ? clearTimeout(timer) : refresh()));
  if (/[#?&]token=/.test(location.hash)) await takeTokenFromHash();
  else await signIn(token());
  refresh();
}

start();
