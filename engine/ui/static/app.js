// The outbound-log page. Plain ES module, no framework, no build step. Everything that comes
// from the log (bodies, errors, names) is put on the page with textContent only.

import { customerHref, highlightInto, setupInsight } from "./insight.js";
import { enterViews, leaveViews, setupViews } from "./operate.js";

const $ = (id) => document.getElementById(id);
const PARAMS = ["identifier", "customer_id", "error", "status", "connection", "start", "end", "tag"];
const LABELS = {
  identifier: "id", customer_id: "customer", error: "error", status: "status",
  connection: "connection", start: "from", end: "to", tag: "tag",
};
const KEYS = {
  id: "identifier", identifier: "identifier", customer: "customer_id", customer_id: "customer_id",
  error: "error", status: "status", connection: "connection", start: "start", from: "start",
  end: "end", to: "end", tag: "tag", tags: "tag",
};
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const STATUS = /^(?:[1-5]xx|\d{1,3})(?:\s*,\s*(?:[1-5]xx|\d{1,3}))*$/i;
const LAST = /^(\d+)\s*([mhd])$/i;
const MAX_ROWS = 1000;

let csrf = "";
let nextToken = "";
let source = null;
let paused = false;
let waiting = [];
let listed = new Set();
let lastEventId = "";

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = String(text);
  return node;
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  if (options.method === "POST") headers["X-CSRF-Token"] = csrf;
  const response = await fetch(path, { credentials: "same-origin", ...options, headers });
  let body = {};
  try { body = await response.json(); } catch { body = {}; }
  if (response.status === 401 && !path.startsWith("/ui/session")) showLogin();
  return { ok: response.ok, status: response.status, body };
}

// -- search: the URL holds it -------------------------------------------------------------

function criteria() {
  const query = new URLSearchParams(location.search);
  const found = [];
  for (const key of PARAMS) {
    const value = query.get(key);
    if (value) found.push([key, value]);
  }
  return found;
}

function setCriteria(list, push = true) {
  const query = new URLSearchParams();
  for (const [k, v] of list) query.set(k, v);
  const url = `${location.pathname}${query.toString() ? "?" + query : ""}`;
  if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
  renderChips();
  reload();
}

function parseCriterion(text) {
  text = text.trim();
  if (!text) return null;
  const colon = text.indexOf(":");
  const key = colon > 0 ? text.slice(0, colon).trim().toLowerCase() : "";
  if (key === "last" || key === "since") {
    const m = LAST.exec(text.slice(colon + 1).trim());
    if (!m) throw new Error("last: takes minutes, hours or days, e.g. last:15m, last:1h, last:7d");
    const unit = { m: 60e3, h: 3600e3, d: 86400e3 }[m[2].toLowerCase()];
    return ["start", new Date(Date.now() - Number(m[1]) * unit).toISOString()];
  }
  if (key in KEYS) {
    const value = text.slice(colon + 1).trim();
    if (!value) throw new Error(`${key}: needs a value`);
    return [KEYS[key], value];
  }
  if (UUID.test(text)) return ["identifier", text];
  if (STATUS.test(text)) return ["status", text.replace(/\s+/g, "")];
  return ["customer_id", text];
}

function renderChips() {
  const chips = $("chips");
  chips.replaceChildren();
  for (const [key, value] of criteria()) {
    const shown = key === "start" || key === "end" ? localTime(value) : value;
    const button = el("button", {
      type: "button", class: "chip", "aria-label": `Remove ${LABELS[key]}: ${shown}`,
    }, `${LABELS[key]}: ${shown} ×`);
    button.addEventListener("click", () => {
      setCriteria(criteria().filter(([k]) => k !== key));
      $("search").focus();
    });
    const item = el("li");
    item.append(button);
    chips.append(item);
  }
}

function filterQuery() {
  const query = new URLSearchParams();
  for (const [k, v] of criteria()) query.set(k, v);
  return query;
}

// -- the table ------------------------------------------------------------------------------

function localTime(iso) {
  const date = new Date(iso);
  return isNaN(date) ? iso : date.toLocaleString();
}

function statusClass(code) {
  return `status s${Math.floor(code / 100)}`;
}

function rowFor(entry, fresh) {
  const tr = el("tr", { class: fresh ? "entry new" : "entry", tabindex: "0", "aria-expanded": "false" });
  tr.dataset.id = entry.id;
  const time = el("td", { class: "time" });
  time.append(el("time", { datetime: entry.time, title: `${entry.time} (UTC)` }, localTime(entry.time)));
  const customer = el("td", { class: "customer" });
  const first = entry.customers[0];
  if (first) {
    customer.append(el("span", { class: "name" }, first.name || "(no name)"));
    const cid = el("a", { class: "cid", href: customerHref(first.customerId), title: "Everything sent for this customer" }, first.customerId);
    cid.addEventListener("click", (e) => e.stopPropagation());
    cid.addEventListener("keydown", (e) => e.stopPropagation());
    customer.append(cid);
    if (entry.customerCount > 1) customer.append(el("span", { class: "cid" }, `+${entry.customerCount - 1} more`));
  }
  const status = el("td");
  status.append(el("span", { class: statusClass(entry.statusCode) }, entry.statusCode || "none"));
  tr.append(
    time, customer, status,
    el("td", { class: "rt" }, Number(entry.responseTimeSeconds).toFixed(3)),
    el("td", { class: "error" }, entry.error),
    el("td", { class: "id" }, entry.id),
  );
  tr.addEventListener("click", () => toggle(tr));
  tr.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); toggle(tr); }
  });
  return tr;
}

function addRows(entries, atTop) {
  const body = $("rows");
  const fresh = [];
  for (const entry of entries) {
    if (listed.has(entry.id)) continue;
    listed.add(entry.id);
    fresh.push(rowFor(entry, atTop));
  }
  if (atTop) {
    for (const tr of fresh) body.prepend(tr);  // a batch is oldest first: the newest ends on top
  } else {
    body.append(...fresh);
  }
  while (atTop && body.rows.length > MAX_ROWS) {
    const last = body.lastElementChild;
    listed.delete(last.dataset.id);
    last.remove();
  }
  $("empty").hidden = body.rows.length > 0;
}

let searchGeneration = 0; // a reload starts a new one: answers to older searches are dropped

async function reload() {
  searchGeneration += 1;
  lastEventId = "";
  $("rows").replaceChildren();
  listed = new Set();
  nextToken = "";
  waiting = [];
  const generation = searchGeneration;
  await loadPage();
  if (source && generation === searchGeneration) startLive();
}

async function loadPage() {
  const generation = searchGeneration;
  const query = filterQuery();
  if (nextToken) query.set("page_token", nextToken);
  const { ok, body } = await api(`/ui/api/logs?${query}`);
  if (generation !== searchGeneration) return; // the search changed while this was asked
  $("list-error").textContent = ok ? "" : body.error || "the log could not be read";
  $("search-error").textContent = "";
  if (!ok) { $("more").hidden = true; return; }
  addRows(body.logs, false);
  nextToken = body.nextPageToken;
  $("more").hidden = !nextToken;
  $("empty").hidden = $("rows").rows.length > 0;
}

// -- a row's details --------------------------------------------------------------------------

function bodyBlock(title, text) {
  const box = el("div");
  const head = el("h3", {}, title);
  const copy = el("button", { type: "button", class: "copy" }, "Copy");
  copy.setAttribute("aria-label", `Copy the ${title.toLowerCase()}`);
  const pre = el("pre", { tabindex: "0", class: "json" });
  const shown = highlightInto(pre, text);
  copy.addEventListener("click", async (e) => {
    e.stopPropagation();
    try { await navigator.clipboard.writeText(shown); copy.textContent = "Copied"; }
    catch { copy.textContent = "Copy failed"; }
  });
  head.append(" ", copy);
  box.append(head, pre);
  return box;
}

async function toggle(tr) {
  const open = tr.nextElementSibling;
  if (open && open.classList.contains("detail")) {
    open.remove();
    tr.setAttribute("aria-expanded", "false");
    return;
  }
  tr.setAttribute("aria-expanded", "true");
  const detail = el("tr", { class: "detail" });
  const cell = el("td", { colspan: "6" }, "Loading…");
  detail.append(cell);
  tr.after(detail);
  const { ok, body } = await api(`/ui/api/logs/${encodeURIComponent(tr.dataset.id)}`);
  cell.replaceChildren();
  if (!ok) { cell.append(el("p", { class: "error" }, body.error || "not found")); return; }
  const e = body.log;
  const facts = el("dl");
  for (const [k, v] of [
    ["Connection", e.connectionId], ["Request", `${e.method} ${e.url}`],
    ["Mapping version", e.mappingVersion], ["Attempt", e.attempt],
    ["Ambiguous", e.ambiguous ? "yes: no answer came back; the destination may have applied it" : "no"],
    ["Tags", (e.tags || []).join(", ") || "none"], ["Identifier", e.id],
  ]) facts.append(el("dt", {}, k), el("dd", {}, v));
  const outcomes = el("table", { class: "outcomes" });
  const head = el("tr");
  for (const h of ["Customer ID", "Name", "Outcome", "Message"]) head.append(el("th", { scope: "col" }, h));
  outcomes.append(head);
  for (const c of e.customers) {
    const row = el("tr");
    const id = el("td");
    id.append(el("a", { href: customerHref(c.customerId) }, c.customerId));
    row.append(id, el("td", {}, c.name), el("td", {}, c.outcome), el("td", {}, c.error));
    outcomes.append(row);
  }
  const bodies = el("div", { class: "bodies" });
  bodies.append(bodyBlock("Request body", e.requestBody), bodyBlock("Response body", e.responseBody));
  cell.append(facts, el("h3", {}, `Customers (${e.customerCount})`), outcomes, bodies);
}

// -- live mode ----------------------------------------------------------------------------------

function liveState(text) { $("live-state").textContent = text; }

function startLive(after = "") {
  stopLive();
  // The browser resends the last event's id when it reconnects by itself; `after` does the
  // same for a stream this page closed (a hidden tab): the server replays what it missed.
  const query = filterQuery();
  if (after) query.set("after", after);
  source = new EventSource(`/ui/api/logs/stream?${query}`);
  liveState("connecting…");
  source.addEventListener("open", () => liveState("live"));
  source.addEventListener("error", () => {
    // A refused reconnect (the session ended) closes the source for good: ask why.
    if (source && source.readyState === EventSource.CLOSED) sessionLost();
    else liveState("reconnecting…");
  });
  source.addEventListener("ended", (event) => {
    stopLive();
    showLogin(JSON.parse(event.data));
  });
  source.addEventListener("logs", (event) => {
    lastEventId = event.lastEventId;
    const entries = JSON.parse(event.data).logs;
    if (paused) {
      waiting.push(...entries);
      $("pause").textContent = `Resume (${waiting.length} new)`;
    } else {
      addRows(entries, true);
    }
  });
  $("live").setAttribute("aria-pressed", "true");
  $("pause").hidden = false;
}

function stopLive() {
  if (source) source.close();
  source = null;
  liveState("");
}

function setPaused(value) {
  paused = value;
  $("pause").setAttribute("aria-pressed", String(value));
  if (!value) {
    addRows(waiting, true);
    waiting = [];
    $("pause").textContent = "Pause";
  } else {
    $("pause").textContent = "Resume (0 new)";
  }
}

// -- login ----------------------------------------------------------------------------------------

function showLogin(reason = "") {
  stopLive();
  leaveViews();
  $("logs").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = reason;
  $("token").focus();
}

async function sessionLost() {
  stopLive();
  let answer = null;
  try { answer = await api("/ui/session"); } catch { answer = null; } // the engine is down
  if (answer && answer.status === 401) {
    showLogin("The session ended (logged out, or its token was revoked or expired): log in again.");
    return;
  }
  liveState("reconnecting…");
  setTimeout(() => {
    const wanted = $("live").getAttribute("aria-pressed") === "true";
    if (!source && wanted && !$("logs").hidden) startLive(lastEventId);
  }, 2000);
}

function showApp(session) {
  csrf = session.csrfToken;
  $("who-name").textContent = `${session.name} (${session.role})`;
  $("who").hidden = false;
  $("login").hidden = true;
  $("logs").hidden = false;
  renderChips();
  reload();
  enterViews(session);
}

async function start() {
  setupViews({ api, el, localTime });
  setupInsight(showLogin);
  $("login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const { ok, body } = await api("/ui/session", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token: $("token").value }),
    });
    $("token").value = "";
    if (!ok) { $("login-error").textContent = body.error || "login failed"; return; }
    $("login-error").textContent = "";
    showApp(body);
  });
  $("logout").addEventListener("click", async () => {
    await api("/ui/logout", { method: "POST" });
    csrf = "";
    $("rows").replaceChildren();
    showLogin();
  });
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    try {
      const found = parseCriterion($("search").value);
      if (!found) return;
      const rest = criteria().filter(([k]) => k !== found[0]);
      $("search").value = "";
      setCriteria([...rest, found]);
    } catch (err) {
      $("search-error").textContent = err.message;
    }
  });
  $("search").addEventListener("keydown", (e) => {
    if (e.key === "Backspace" && !$("search").value) {
      const list = criteria();
      if (list.length) setCriteria(list.slice(0, -1));
    }
  });
  $("reset").addEventListener("click", () => { $("search").value = ""; setCriteria([]); });
  $("more").addEventListener("click", loadPage);
  $("live").addEventListener("click", () => {
    if (source) {
      stopLive();
      setPaused(false);
      $("live").setAttribute("aria-pressed", "false");
      $("pause").hidden = true;
    } else {
      startLive();
    }
  });
  $("pause").addEventListener("click", () => setPaused(!paused));
  window.addEventListener("popstate", () => { renderChips(); reload(); });
  document.addEventListener("visibilitychange", () => {
    // Browsers allow 6 streams per origin: a hidden tab gives its one back.
    if (!$("logs").hidden && $("live").getAttribute("aria-pressed") === "true") {
      if (document.hidden) stopLive(); else startLive(lastEventId);
    }
  });
  document.addEventListener("tidegate:view", (e) => {
    // Another view gives the live stream back; back on the log view, the list is read
    // again (with what was logged meanwhile) and live mode goes on.
    if ($("live").getAttribute("aria-pressed") !== "true") return;
    if (e.detail.view !== "logs") stopLive();
    else if (!source) reload().then(() => startLive());
  });
  const { ok, body } = await api("/ui/session");
  if (ok) showApp(body); else showLogin();
}

start();
