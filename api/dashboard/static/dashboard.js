// The operator dashboard: polls GET api/v1/dashboard once a second and draws it.
// Every call carries the API key (asked for once when the API wants one, kept in this
// tab's sessionStorage); actions call the REST API's own endpoints.
"use strict";

const API = "api/v1";
const KEY_ITEM = "throttler.dashboard.key";
const POLL_MS = 1000;
const STATUSES = ["pending", "queued", "running", "succeeded", "failed", "cancelled"];
const $ = (id) => document.getElementById(id);

let live = false; // the first summary has been drawn
let polling = null;
let openTask = null; // the task id shown, refreshed with each poll
let filter = null; // the last search, refreshed with each poll

class Refused extends Error {}

function storedKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else if (name === "on") for (const [event, fn] of Object.entries(value)) node.addEventListener(event, fn);
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

function showProblem(text) {
  if (!text) delete $("problem").dataset.sticky;
  const box = $("problem");
  box.textContent = text;
  box.hidden = !text;
}

function detailOf(body, response) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) {
    return body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  }
  return `${response.status} ${response.statusText}`;
}

// One call to the API; a 401 asks for a key, a 403 says the key may not.
async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const key = storedKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(`${API}${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  let answer = null;
  if (response.status !== 204) {
    try { answer = await response.json(); } catch (error) { answer = null; }
  }
  if (response.status === 401) {
    askForKey(key ? "401: that key was refused. Enter a key of API_KEYS." : "401: this API needs a key (API_KEYS). It is kept in this tab only.");
    throw new Refused("401");
  }
  if (response.status === 403) {
    throw new Error(`403 forbidden: ${detailOf(answer, response)}`);
  }
  return { status: response.status, ok: response.ok, body: answer, detail: detailOf(answer, response) };
}

function askForKey(reason) {
  if (storedKey()) sessionStorage.removeItem(KEY_ITEM);
  stopPolling();
  $("key-reason").textContent = reason;
  $("key-form").hidden = false;
  $("board").hidden = true;
  $("forget-key").hidden = true;
  $("status-line").textContent = "waiting for a key";
  $("key-input").focus();
}

// --- drawing -------------------------------------------------------------------------

function time(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

function fullTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function number(value) {
  return value === null || value === undefined ? "…" : value.toLocaleString();
}

function drawCounts(summary) {
  const box = $("counts");
  box.replaceChildren(
    ...STATUSES.map((status) =>
      el("div", { class: `count ${status}`, id: `count-${status}` }, el("b", {}, number(summary.counts[status])), status)),
    el("div", { class: "count", id: "count-outbox" }, el("b", {}, number(summary.outbox_backlog)), "in the outbox"),
  );
  $("counts-note").textContent = summary.finished_as_of
    ? `finished counts as of ${time(summary.finished_as_of)} (refreshed with /metrics); oldest outbox row ${summary.outbox_oldest_age_s.toFixed(1)} s`
    : "counting finished tasks…";
}

function chart(scope, values, cap) {
  const width = 300;
  const height = 70;
  const peak = Math.max(1, cap || 0, ...values) * 1.15;
  const x = (i) => (i / (values.length - 1)) * width;
  const y = (v) => height - (v / peak) * (height - 4);
  const points = values.map((v, i) => `${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  const drawing = svg("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img", "aria-label": `releases per second of ${scope}` });
  drawing.append(svg("line", { class: "axis", x1: 0, y1: height - 0.5, x2: width, y2: height - 0.5 }));
  drawing.append(svg("polygon", { class: "area", points: `0,${height} ${points} ${width},${height}` }));
  drawing.append(svg("polyline", { class: "series", points }));
  if (cap) drawing.append(svg("line", { class: "cap", x1: 0, y1: y(cap), x2: width, y2: y(cap) }));
  const recent = values.slice(-10);
  const rate = recent.reduce((a, b) => a + b, 0) / recent.length;
  return el("div", { class: "chart", "data-scope": scope },
    el("div", { class: "title" }, el("code", {}, scope),
      el("span", { class: "muted" }, `${rate.toFixed(1)}/s now`, cap ? ` · cap ${cap}/s` : " · no rate cap")),
    drawing);
}

function drawCharts(summary) {
  const caps = Object.fromEntries(summary.scopes.map((s) => [s.scope, s.rate_per_s]));
  const series = summary.releases.series;
  $("charts").replaceChildren(...Object.keys(series).map((scope) => chart(scope, series[scope], caps[scope])));
}

function drawInflight(summary) {
  const rows = summary.scopes.map((s) => {
    const share = s.inflight_cap ? Math.min(1, s.inflight / s.inflight_cap) : 0;
    const bar = el("div", { class: share >= 1 ? "bar full" : "bar" }, el("span"));
    bar.firstChild.style.width = `${Math.round(share * 100)}%`;
    return el("tr", { "data-scope": s.scope },
      el("td", {}, el("code", {}, s.scope)),
      el("td", { class: "num" }, s.inflight),
      el("td", { class: "num" }, s.inflight_cap ?? "-"),
      el("td", {}, s.inflight_cap ? bar : ""),
      el("td", { class: "num" }, s.backlog),
      el("td", { class: "num" }, s.rate_per_s ? `${s.rate_per_s}/s` : "-"));
  });
  $("inflight").tBodies[0].replaceChildren(...rows);
}

function drawPaused(summary) {
  const items = summary.paused.map((p) =>
    el("li", { "data-scope": p.scope }, el("code", {}, p.scope), el("span", { class: "muted" }, `until ${fullTime(p.until)}`),
      el("button", { type: "button", class: "resume", on: { click: () => act("POST", `/limits/${encodeURIComponent(p.scope)}/resume`) } }, "Resume")));
  $("paused").replaceChildren(...(items.length ? items : [el("li", { class: "muted" }, "none")]));
}

function drawNodes(summary) {
  if (summary.relays === null) {
    $("nodes").tBodies[0].replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "error-text" }, "Redis unavailable: nodes unknown")));
    return;
  }
  const row = (kind, n) => el("tr", { class: n.alive ? "" : "muted" },
    el("td", {}, kind), el("td", { class: "id" }, n.id), el("td", {}, n.host),
    el("td", { class: "num" }, kind === "worker" ? n.running : ""), el("td", {}, n.alive ? time(n.last_seen) : `dead since ${time(n.last_seen)}`));
  const rows = [...summary.relays.map((n) => row("relay", n)), ...summary.workers.map((n) => row("worker", n))];
  $("nodes").tBodies[0].replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 5, class: "error-text" }, "no relay or worker is alive"))]));
}

function taskLink(id) {
  return el("a", { class: "id", "data-task": id, on: { click: () => showTask(id) } }, id);
}

function drawFailures(summary) {
  const rows = summary.failures.map((f) => el("tr", {},
    el("td", {}, time(f.at)), el("td", {}, taskLink(f.task_id)), el("td", {}, f.name),
    el("td", {}, f.account), el("td", { class: "error-text" }, f.error ?? "")));
  $("failures").tBodies[0].replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 5, class: "muted" }, "none in the last 24 hours"))]));
}

function waitingText(waiting) {
  if (!waiting) return "";
  const scope = waiting.scope ? ` (${waiting.scope})` : "";
  const until = waiting.until ? ` until ${fullTime(waiting.until)}` : "";
  const why = {
    scheduled: "scheduled", no_relay: "no relay is alive", paused: "paused", inflight: "at its in-flight cap",
    rate: "waiting for a rate token", queue_full: "ARQ's queue is full", turn: "waiting for its turn",
  }[waiting.reason] || waiting.reason;
  return `waiting: ${why}${scope}${until}`;
}

function drawTask(answer) {
  const task = answer.task;
  $("task").hidden = false;
  $("task").dataset.status = task.status;
  $("task-title").textContent = task.task_id;
  const fields = [
    ["status", el("span", { class: `status-${task.status}`, id: "task-status" }, task.status)],
    ["name", task.name], ["account", answer.account], ["attempts", task.attempts], ["priority", task.priority],
    ["keys", task.keys.join(", ") || "-"], ["created", fullTime(task.created_at)],
    ["finished", fullTime(task.finished_at) || "-"],
    ["result", task.result ? JSON.stringify(task.result) : "-"],
    ["error", task.error ? el("span", { class: "error-text" }, task.error) : "-"],
  ];
  $("task-view").replaceChildren(...fields.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, value)]));
  $("task-waiting").textContent = waitingText(task.waiting);
  $("task-events").replaceChildren(...answer.events.map((e) => {
    const detail = Object.entries(e.detail).map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
    return el("li", { "data-event": e.event }, el("b", {}, e.event), ` ${fullTime(e.at)} `, el("span", { class: "muted" }, detail));
  }));
}

async function showTask(id) {
  openTask = id.trim();
  $("task-message").textContent = "";
  await refreshTask();
}

async function refreshTask() {
  if (!openTask) return;
  const answer = await api("GET", `/dashboard/tasks/${encodeURIComponent(openTask)}`);
  if (!answer.ok) {
    $("task").hidden = false;
    $("task-title").textContent = openTask;
    $("task-view").replaceChildren();
    $("task-events").replaceChildren();
    $("task-waiting").textContent = `${answer.status}: ${answer.detail}`;
    return;
  }
  drawTask(answer.body);
}

async function refreshResults() {
  if (!filter) return;
  const answer = await api("GET", `/tasks?${filter}`);
  const table = $("results");
  table.hidden = false;
  if (!answer.ok) {
    table.tBodies[0].replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "error-text" }, `${answer.status}: ${answer.detail}`)));
    return;
  }
  const rows = answer.body.tasks.map((t) => el("tr", {},
    el("td", {}, taskLink(t.task_id)), el("td", {}, t.name), el("td", { class: `status-${t.status}` }, t.status),
    el("td", { class: "waiting" }, waitingText(t.waiting)), el("td", {}, fullTime(t.created_at))));
  table.tBodies[0].replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 5, class: "muted" }, "no task matches"))]));
}

// --- polling ---------------------------------------------------------------------------

async function poll() {
  try {
    const answer = await api("GET", "/dashboard");
    if (!answer.ok) throw new Error(`${answer.status}: ${answer.detail}`);
    const summary = answer.body;
    document.body.classList.toggle("admin", summary.admin);
    $("board").hidden = false;
    $("key-form").hidden = true;
    $("forget-key").hidden = !storedKey();
    drawCounts(summary);
    drawCharts(summary);
    drawInflight(summary);
    drawPaused(summary);
    drawNodes(summary);
    drawFailures(summary);
    $("status-line").textContent = `live · ${summary.account}${summary.admin ? " (admin)" : ""} · updated ${time(summary.as_of)}`;
    if (!live) {
      live = true;
      document.documentElement.dataset.live = "1";
      performance.mark("dashboard:live");
    }
    await Promise.all([refreshTask(), refreshResults()]);
    if (!$("problem").dataset.sticky) showProblem("");
  } catch (error) {
    if (error instanceof Refused) return; // the key form is shown; polling stopped
    showProblem(String(error.message || error));
  }
  polling = setTimeout(poll, POLL_MS);
}

function startPolling() {
  stopPolling();
  poll();
}

function stopPolling() {
  if (polling !== null) clearTimeout(polling);
  polling = null;
}

// An action: its refusal stays on screen until the next action.
async function act(method, path, body) {
  try {
    const answer = await api(method, path, body);
    if (!answer.ok) throw new Error(`${answer.status}: ${answer.detail}`);
    delete $("problem").dataset.sticky;
    showProblem("");
    return answer;
  } catch (error) {
    if (error instanceof Refused) return null;
    $("problem").dataset.sticky = "1";
    showProblem(String(error.message || error));
    return null;
  }
}

function numberOrNull(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function wire() {
  $("problem").addEventListener("click", () => showProblem(""));
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_ITEM, $("key-input").value.trim());
    $("key-input").value = "";
    startPolling();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_ITEM);
    location.reload();
  });
  $("id-form").addEventListener("submit", (event) => {
    event.preventDefault();
    showTask($("task-id").value).catch((error) => showProblem(String(error.message || error)));
  });
  $("filter-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = new URLSearchParams({ limit: "20" });
    for (const [name, id] of [["status", "filter-status"], ["name", "filter-name"], ["key", "filter-key"], ["account", "filter-account"]]) {
      const value = $(id).value.trim();
      if (value && !(name === "account" && !document.body.classList.contains("admin"))) query.set(name, value);
    }
    filter = query.toString();
    refreshResults().catch((error) => showProblem(String(error.message || error)));
  });
  $("task-cancel").addEventListener("click", async () => {
    const answer = await act("POST", `/tasks/${encodeURIComponent(openTask)}/cancel`);
    if (answer) $("task-message").textContent = "cancelled";
    await refreshTask();
  });
  $("task-retry").addEventListener("click", async () => {
    const answer = await act("POST", `/tasks/${encodeURIComponent(openTask)}/retry`);
    if (answer) $("task-message").textContent = "back to pending";
    await refreshTask();
  });
  $("pause-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    await act("POST", `/limits/${encodeURIComponent($("pause-scope").value.trim())}/pause`, { for_s: Number($("pause-seconds").value) });
  });
  $("limit-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = {};
    const rate = $("limit-rate").value.trim();
    if (rate) body.rate = rate;
    const burst = numberOrNull("limit-burst");
    if (burst !== null) body.burst = burst;
    const inflight = numberOrNull("limit-inflight");
    if (inflight !== null) body.inflight = inflight;
    await act("PUT", `/limits/${encodeURIComponent($("limit-scope").value.trim())}`, body);
  });
}

wire();
startPolling();
