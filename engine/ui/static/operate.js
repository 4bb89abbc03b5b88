// The page's operator views: connections and dead letters, and the navigation between
// views. Each view's state lives in the URL hash (#/connections, #/dead-letters?stage=send),
// so a link reproduces it; the log view keeps its search in the query string. Everything
// that comes from the engine is put on the page with textContent only.

const $ = (id) => document.getElementById(id);
// The views are the bar's links: <a href="#/NAME" data-view="NAME"> shows <section id="NAME">
// and hides the others. Another module loads its view on the "tidegate:view" event.
const views = () => [...document.querySelectorAll("#views a[data-view]")].map((a) => a.dataset.view);
const FILTERS = ["connection", "customer", "stage", "error", "start", "end"];

let kit = null;         // { api, el, localTime } from app.js
let role = "viewer";
let routed = "";        // the hash last shown, so a repeated event does nothing
let dlFilter = new URLSearchParams();
let dlNext = "";
let pending = null;     // the replay waiting for its confirmation: its request body

const canOperate = () => role === "operator" || role === "admin";

// -- navigation ------------------------------------------------------------------------------

function current() {
  const hash = location.hash.startsWith("#/") ? location.hash.slice(2) : "";
  const [name, query = ""] = hash.split("?", 2);
  return { view: views().includes(name) ? name : "logs", query: new URLSearchParams(query) };
}

function go(hash) {
  // pushState changes no log search and fires no popstate: only this view reloads.
  history.pushState(null, "", `${location.pathname}${location.search}${hash}`);
  route();
}

function route(force = false) {
  if ($("views").hidden) return;  // logged out
  const key = location.hash;
  if (key === routed && !force) return;
  routed = key;
  const { view, query } = current();
  for (const link of document.querySelectorAll("#views a[data-view]")) {
    $(link.dataset.view).hidden = link.dataset.view !== view;
    if (link.dataset.view === view) {
      link.setAttribute("aria-current", "page");
      document.title = `Tidegate: ${view === "logs" ? "outbound log" : link.textContent.toLowerCase()}`;
    } else {
      link.removeAttribute("aria-current");
    }
  }
  if (view === "connections") loadConnections();
  if (view === "dead-letters") showDeadLetters(query);
  document.dispatchEvent(new CustomEvent("tidegate:view", { detail: { view, query } }));
}

// -- small helpers ------------------------------------------------------------------------------

function timeCell(iso) {
  const cell = kit.el("td");
  if (!iso) { cell.textContent = "none"; return cell; }
  cell.append(kit.el("time", { datetime: iso, title: `${iso} (UTC)` }, kit.localTime(iso)));
  return cell;
}

function age(seconds) {
  const s = Math.round(Number(seconds));
  if (!s) return "–";
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function toLocalInput(iso) {
  // An ISO time as a datetime-local value (the viewer's time zone, to the minute).
  const date = new Date(iso || "");
  if (!iso || isNaN(date)) return "";
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}` +
    `T${pad(date.getHours())}:${pad(date.getMinutes())}`;
}

function plural(n, one, many) { return `${n} ${Number(n) === 1 ? one : many}`; }

function pretty(text) {
  if (!text) return "";
  try { return JSON.stringify(JSON.parse(text), null, 2); } catch { return text; }
}

// -- connections --------------------------------------------------------------------------------

function recentCell(entry, withError) {
  const cell = kit.el("td", { class: withError ? "recent error" : "recent" });
  if (!entry) { cell.textContent = "none in the last day"; return cell; }
  cell.append(kit.el("time", { datetime: entry.time, title: `${entry.time} (UTC)` },
    kit.localTime(entry.time)));
  if (withError) {
    cell.append(kit.el("span", { class: "cid" }, `${entry.statusCode || "no answer"}: ${entry.error}`));
  }
  return cell;
}

function connectionRow(c) {
  const tr = kit.el("tr", { class: "connection" });
  tr.dataset.id = c.id;
  const name = kit.el("td");
  name.append(kit.el("span", { class: "name" }, c.displayName || c.id));
  if (c.displayName) name.append(kit.el("span", { class: "cid" }, c.id));
  const paused = c.state === "CONNECTION_STATE_PAUSED";
  const state = kit.el("td", { class: "state" });
  state.append(kit.el("span", { class: paused ? "badge paused" : "badge active" },
    paused ? "paused" : "active"));
  if (paused && c.stateReason) state.append(kit.el("span", { class: "reason" }, c.stateReason));
  const dead = kit.el("td", { class: "num dead" });
  const link = kit.el("a", { href: `#/dead-letters?connection=${encodeURIComponent(c.id)}` },
    c.deadLetterCount);
  link.addEventListener("click", (e) => { e.preventDefault(); go(link.getAttribute("href")); });
  dead.append(link);
  const actions = kit.el("td");
  if (paused && canOperate()) {
    const button = kit.el("button", { type: "button", class: "resume" }, "Resume");
    button.setAttribute("aria-label", `Resume ${c.id}`);
    button.addEventListener("click", () => resume(c.id, button));
    actions.append(button);
  }
  tr.append(
    name, kit.el("td", {}, c.connector), state,
    kit.el("td", { class: "num depth" }, c.queueDepth),
    kit.el("td", { class: "num" }, age(c.oldestPendingAgeSeconds)),
    dead, recentCell(c.lastSuccess, false), recentCell(c.lastError, true), actions,
  );
  return tr;
}

async function loadConnections() {
  $("conn-error").textContent = "";
  const { ok, body } = await kit.api("/ui/api/connections");
  if (!ok) { $("conn-error").textContent = body.error || "the connections could not be read"; return; }
  $("conn-rows").replaceChildren(...body.connections.map(connectionRow));
  $("conn-empty").hidden = body.connections.length > 0;
  $("conn-more").hidden = !body.nextPageToken;  // more than 1,000 connections: see the API
}

async function resume(id, button) {
  button.disabled = true;
  const { ok, body } = await kit.api(`/ui/api/connections/${encodeURIComponent(id)}/resume`,
    { method: "POST" });
  if (!ok) {
    button.disabled = false;
    $("conn-error").textContent = body.error || "the connection could not be resumed";
    return;
  }
  $("conn-status").textContent = `${id} resumed: one probe request goes out first.`;
  await loadConnections();
  $("conn-status").focus();
}

// -- dead letters ------------------------------------------------------------------------------

function showDeadLetters(query) {
  dlFilter = new URLSearchParams();
  for (const key of FILTERS) if (query.get(key)) dlFilter.set(key, query.get(key));
  const form = $("dl-filters");
  for (const key of ["connection", "customer", "stage", "error"]) {
    form.elements[key].value = dlFilter.get(key) || "";
  }
  for (const key of ["start", "end"]) form.elements[key].value = toLocalInput(dlFilter.get(key));
  $("dl-replay-all").hidden = !canOperate();
  $("dl-replay-all").disabled = [...dlFilter.keys()].length === 0;
  $("dl-replay-all").title = $("dl-replay-all").disabled
    ? "Set a filter first: replaying every dead letter needs one" : "";
  closeConfirm();
  $("dl-rows").replaceChildren();
  dlNext = "";
  loadDeadLetters();
}

async function loadDeadLetters() {
  const query = new URLSearchParams(dlFilter);
  if (dlNext) query.set("page_token", dlNext);
  const { ok, body } = await kit.api(`/ui/api/dead-letters?${query}`);
  $("dl-error").textContent = ok ? "" : body.error || "the dead letters could not be read";
  if (!ok) { $("dl-more").hidden = true; return; }
  for (const d of body.deadLetters) $("dl-rows").append(deadLetterRow(d));
  dlNext = body.nextPageToken;
  $("dl-more").hidden = !dlNext;
  $("dl-empty").hidden = $("dl-rows").rows.length > 0;
}

function deadLetterRow(d) {
  const tr = kit.el("tr", { class: "entry", tabindex: "0", "aria-expanded": "false" });
  tr.dataset.id = d.id;
  tr.append(
    kit.el("td", { class: "num" }, d.id), timeCell(d.failTime),
    kit.el("td", {}, d.connectionId), kit.el("td", { class: "customer" }, d.customerId),
    kit.el("td", {}, d.stage), kit.el("td", { class: "error" }, d.error),
    kit.el("td", { class: "num" }, d.attempts),
  );
  const toggle = () => toggleDeadLetter(tr, d);
  tr.addEventListener("click", toggle);
  tr.addEventListener("keydown", (e) => {
    if (e.target === tr && (e.key === "Enter" || e.key === " ")) { e.preventDefault(); toggle(); }
  });
  return tr;
}

function block(title, text) {
  const box = kit.el("div");
  box.append(kit.el("h3", {}, title), kit.el("pre", { tabindex: "0" }, text));
  return box;
}

function toggleDeadLetter(tr, d) {
  const open = tr.nextElementSibling;
  if (open && open.classList.contains("detail")) {
    open.remove();
    tr.setAttribute("aria-expanded", "false");
    return;
  }
  tr.setAttribute("aria-expanded", "true");
  const detail = kit.el("tr", { class: "detail" });
  const cell = kit.el("td", { colspan: "7" });
  const facts = kit.el("dl");
  for (const [k, v] of [
    ["Error", d.error], ["Kind", d.kind], ["Event id", d.eventId],
    ["Queued", kit.localTime(d.enqueueTime)], ["Failed", kit.localTime(d.failTime)],
    ["Attempts", d.attempts],
  ]) facts.append(kit.el("dt", {}, k), kit.el("dd", {}, v));
  const request = kit.el("dd");
  if (d.requestId) {
    // The log view, searching for the request of the last attempt.
    request.append(kit.el("a", { href: `/ui/?identifier=${encodeURIComponent(d.requestId)}` },
      d.requestId));
  } else {
    request.textContent = "none sent";
  }
  facts.append(kit.el("dt", {}, "Last request"), request);
  const bodies = kit.el("div", { class: "bodies" });
  bodies.append(
    block("Stored record", pretty(d.recordJson)),
    block("Rendered fragment", pretty(d.renderedJson) || "(none: it failed before it was rendered)"),
  );
  cell.append(facts, bodies);
  if (canOperate()) {
    const button = kit.el("button", { type: "button", class: "replay-one" }, "Replay this one…");
    button.addEventListener("click", (e) => {
      e.stopPropagation();
      askReplay({ ids: [Number(d.id)] }, button);
    });
    cell.append(button);
  }
  detail.append(cell);
  tr.after(detail);
}

function filterBody() {
  const body = {};
  for (const [k, v] of dlFilter) body[k] = v;
  return body;
}

async function askReplay(selection, opener) {
  $("dl-result").textContent = "";
  const { ok, body } = await kit.api("/ui/api/dead-letters/replay", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...selection, dry_run: true }),
  });
  if (!ok) { $("dl-error").textContent = body.error || "the replay could not be counted"; return; }
  const count = Number(body.replayed);
  const skipped = Number(body.skipped || 0);
  if (count === 0) {
    $("dl-result").textContent = "No dead letter matches: nothing to queue again.";
    return;
  }
  pending = { selection, opener };
  let text = `${plural(count, "dead letter", "dead letters")} will be queued again.`;
  if (skipped) text += ` ${skipped} more cannot be (no stored request).`;
  $("dl-confirm-text").textContent = text;
  $("dl-confirm").hidden = false;
  $("dl-confirm").scrollIntoView({ block: "nearest" });
  $("dl-confirm-yes").focus();
}

function closeConfirm() {
  const opener = pending && pending.opener;
  pending = null;
  $("dl-confirm").hidden = true;
  return opener;
}

async function confirmReplay() {
  if (!pending) return;
  const { selection } = pending;
  closeConfirm();
  const { ok, body } = await kit.api("/ui/api/dead-letters/replay", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...selection, dry_run: false }),
  });
  if (!ok) { $("dl-error").textContent = body.error || "the replay failed"; return; }
  $("dl-rows").replaceChildren();
  dlNext = "";
  await loadDeadLetters();
  $("dl-result").textContent =
    `${plural(Number(body.replayed), "dead letter", "dead letters")} queued again.`;
  $("dl-result").focus();
}

// -- wiring ---------------------------------------------------------------------------------

export function setupViews(fromApp) {
  kit = fromApp;
  for (const link of document.querySelectorAll("#views a[data-view]")) {
    link.addEventListener("click", (e) => {
      e.preventDefault();
      go(link.getAttribute("href"));
    });
  }
  window.addEventListener("popstate", () => route());
  window.addEventListener("hashchange", () => route());
  $("conn-refresh").addEventListener("click", loadConnections);
  $("dl-filters").addEventListener("submit", (e) => {
    e.preventDefault();
    const query = new URLSearchParams();
    const form = $("dl-filters");
    for (const key of ["connection", "customer", "stage", "error"]) {
      const value = form.elements[key].value.trim();
      if (value) query.set(key, value);
    }
    for (const key of ["start", "end"]) {
      // datetime-local holds the viewer's local time; the address holds UTC.
      const value = form.elements[key].value;
      if (value && !isNaN(new Date(value))) query.set(key, new Date(value).toISOString());
    }
    go(`#/dead-letters${[...query.keys()].length ? "?" + query : ""}`);
  });
  $("dl-reset").addEventListener("click", () => go("#/dead-letters"));
  $("dl-more").addEventListener("click", loadDeadLetters);
  $("dl-replay-all").addEventListener("click", () => askReplay(filterBody(), $("dl-replay-all")));
  $("dl-confirm-yes").addEventListener("click", confirmReplay);
  $("dl-confirm-no").addEventListener("click", () => {
    const opener = closeConfirm();
    $("dl-result").textContent = "Nothing was queued.";
    if (opener) opener.focus();
  });
  $("dl-confirm").addEventListener("keydown", (e) => {
    if (e.key === "Escape") $("dl-confirm-no").click();
  });
}

export function enterViews(session) {
  role = session.role;
  $("views").hidden = false;
  route(true);
}

export function leaveViews() {
  $("views").hidden = true;
  for (const name of views()) if (name !== "logs") $(name).hidden = true;
  routed = "";
  closeConfirm();
}
