// The page's insight views: one customer's ledger and the charts, plus the JSON highlighter
// the log's row details use. Plain ES module; everything from the log goes on the page as
// text nodes (textContent), the charts are SVG built with DOM calls.

const SVG = "http://www.w3.org/2000/svg";
const CLASSES = ["2xx", "4xx", "5xx", "network", "other"];
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

function localTime(iso) {
  const date = new Date(iso);
  return isNaN(date) ? iso : date.toLocaleString();
}

function timeCell(iso) {
  const td = el("td", { class: "time" });
  td.append(el("time", { datetime: iso, title: `${iso} (UTC)` }, localTime(iso)));
  return td;
}

function link(href, text, attrs = {}) {
  return el("a", { href, ...attrs }, text);
}

// -- JSON highlighting ------------------------------------------------------------------------

const TOKENS = /("(?:\\.|[^"\\])*")(\s*:)?|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|\b(true|false|null)\b/g;

/** Puts `text` into `pre`: pretty-printed and highlighted (keys, strings, numbers,
 * literals as spans with classes) when it is JSON, as plain text otherwise. Text nodes only. */
export function highlightInto(pre, text) {
  pre.replaceChildren();
  if (!text) { pre.textContent = "(empty)"; return "(empty)"; }
  let pretty;
  try { pretty = JSON.stringify(JSON.parse(text), null, 2); } catch { pre.textContent = text; return text; }
  let at = 0;
  for (const m of pretty.matchAll(TOKENS)) {
    if (m.index > at) pre.append(document.createTextNode(pretty.slice(at, m.index)));
    if (m[1] !== undefined) {
      pre.append(el("span", { class: m[2] !== undefined ? "j-key" : "j-str" }, m[1]));
      if (m[2] !== undefined) pre.append(document.createTextNode(m[2]));
    } else if (m[3] !== undefined) {
      pre.append(el("span", { class: "j-num" }, m[3]));
    } else {
      pre.append(el("span", { class: "j-lit" }, m[4]));
    }
    at = m.index + m[0].length;
  }
  if (at < pretty.length) pre.append(document.createTextNode(pretty.slice(at)));
  return pretty;
}

// -- routing ------------------------------------------------------------------------------------

let unauthorized = () => {};

async function getJson(path) {
  const response = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  let body = {};
  try { body = await response.json(); } catch { body = {}; }
  if (response.status === 401) unauthorized();
  return { ok: response.ok, body };
}

/** Loads the customer and charts views when the page's router (operate.js) shows them:
 * `#/customer?id=…&order=oldest`, `#/charts?window=24h&connection=…&end=…`. */
export function setupInsight(onUnauthorized) {
  unauthorized = onUnauthorized;
  document.addEventListener("tidegate:view", (e) => {
    const { view, query } = e.detail;
    if (view === "customer") showCustomer(query);
    if (view === "charts") showCharts(query);
  });
}

function viewHref(view, params) {
  const query = new URLSearchParams(params).toString();
  return `#/${view}${query ? "?" + query : ""}`;
}

export function customerHref(id) {
  return viewHref("customer", { id });
}

// -- the customer view ------------------------------------------------------------------------

let ledgerToken = "";

function showCustomer(query) {
  const id = query.get("id") || "";
  const order = query.get("order") === "oldest" ? "oldest" : "newest";
  $("customer-id").textContent = id;
  $("customer-name").textContent = "";
  $("customer-log").href = `/ui/?${new URLSearchParams({ customer_id: id })}`;
  for (const [which, a] of [["newest", $("order-newest")], ["oldest", $("order-oldest")]]) {
    a.href = viewHref("customer", { id, order: which });
    if (which === order) a.setAttribute("aria-current", "true"); else a.removeAttribute("aria-current");
  }
  $("ledger").replaceChildren();
  ledgerToken = "";
  $("ledger-more").onclick = () => loadLedger(id, order);
  loadLedger(id, order);
}

async function loadLedger(id, order) {
  const query = new URLSearchParams({ order });
  if (ledgerToken) query.set("page_token", ledgerToken);
  const { ok, body } = await getJson(`/ui/api/customers/${encodeURIComponent(id)}/ledger?${query}`);
  $("ledger-error").textContent = ok ? "" : body.error || "the ledger could not be read";
  if (!ok) { $("ledger-more").hidden = true; return; }
  const rows = $("ledger");
  const named = body.entries.find((e) => e.name);
  if (named && !$("customer-name").textContent) $("customer-name").textContent = named.name;
  for (const e of body.entries) {
    const tr = el("tr", { class: `outcome-${e.outcome}` });
    const status = el("td");
    status.append(el("span", { class: `status s${Math.floor(e.statusCode / 100)}` }, e.statusCode || "none"));
    const request = el("td", { class: "id" });
    request.append(link(`/ui/?${new URLSearchParams({ identifier: e.requestId })}`, e.requestId));
    tr.append(
      timeCell(e.time),
      el("td", { class: "outcome" }, e.outcome),
      status,
      el("td", { class: "error" }, e.error || e.requestError),
      el("td", {}, e.connectionId),
      el("td", { class: "num" }, e.mappingVersion),
      el("td", { class: "num" }, e.attempt),
      el("td", {}, e.tags.join(", ")),
      request,
    );
    rows.append(tr);
  }
  ledgerToken = body.nextPageToken;
  $("ledger-more").hidden = !ledgerToken;
  $("ledger-empty").hidden = rows.rows.length > 0;
}

// -- the charts ------------------------------------------------------------------------------

const CHART_W = 720;
const CHART_H = 160;
const PAD_L = 40;
const PAD_B = 18;

function showCharts(query) {
  const window = query.get("window") === "24h" ? "24h" : "1h";
  const connection = query.get("connection") || "";
  const end = query.get("end") || "";  // a past window, e.g. a log copied from elsewhere
  for (const [which, a] of [["1h", $("window-1h")], ["24h", $("window-24h")]]) {
    const q = { window: which };
    if (connection) q.connection = connection;
    if (end) q.end = end;
    a.href = viewHref("charts", q);
    if (which === window) a.setAttribute("aria-current", "true"); else a.removeAttribute("aria-current");
  }
  $("charts-all").hidden = !connection;
  $("charts-all").href = viewHref("charts", end ? { window, end } : { window });
  loadCharts(window, connection, end);
}

async function loadCharts(window, connection, end) {
  const query = new URLSearchParams({ window });
  if (connection) query.set("connection", connection);
  if (end) query.set("end", end);
  const { ok, body } = await getJson(`/ui/api/stats?${query}`);
  const panels = $("chart-panels");
  panels.replaceChildren();
  $("charts-error").textContent = ok ? "" : body.error || "the statistics could not be read";
  if (!ok) return;
  $("charts-empty").hidden = body.connections.length > 0;
  for (const c of body.connections) panels.append(panel(c, body, window, end));
}

function seconds(value) {
  return value === null || value === undefined ? "–" : `${Number(value).toFixed(3)} s`;
}

function panel(c, stats, window, end) {
  const box = el("section", { class: "chart-panel", "aria-label": `Connection ${c.connection}` });
  const head = el("h3");
  const only = { window, connection: c.connection };
  if (end) only.end = end;
  head.append(link(viewHref("charts", only), c.connection));
  const facts = el("dl", { class: "chart-facts" });
  for (const [k, v, cls] of [
    ["Requests", c.total, "total"],
    ["Error rate", `${(c.errorRate * 100).toFixed(1)}%`, "error-rate"],
    ["p50", seconds(c.p50), "p50"],
    ["p99", seconds(c.p99), "p99"],
  ]) {
    const item = el("div", { class: `fact ${cls}` });
    item.append(el("dt", {}, k), el("dd", {}, v));
    facts.append(item);
  }
  const per = stats.bucketSeconds === 60 ? "minute" : `${stats.bucketSeconds / 60} minutes`;
  box.append(
    head, facts,
    el("h4", {}, `Requests per ${per} by status class`),
    barChart(c.buckets, stats),
    legend(),
    el("h4", {}, "Response time, p50 and p99 (s)"),
    lineChart(c.buckets),
  );
  return box;
}

function legend() {
  const list = el("ul", { class: "legend" });
  for (const k of CLASSES) {
    const item = el("li");
    item.append(el("span", { class: `swatch c-${k}` }), document.createTextNode(k));
    list.append(item);
  }
  return list;
}

function axis(chart, max, unit) {
  for (const frac of unit || max >= 2 ? [0, 0.5, 1] : [0, 1]) {
    const y = CHART_H - PAD_B - (CHART_H - PAD_B - 8) * frac;
    chart.append(svg("line", { x1: PAD_L, x2: CHART_W, y1: y, y2: y, class: "grid" }));
    const label = svg("text", { x: PAD_L - 4, y: y + 4, class: "tick", "text-anchor": "end" });
    const value = max * frac;
    label.textContent = unit ? value.toFixed(value < 1 ? 2 : 1) : String(Math.round(value));
    chart.append(label);
  }
}

function timeLabels(chart, buckets) {
  const step = (CHART_W - PAD_L) / buckets.length;
  const every = Math.ceil(buckets.length / 6);
  buckets.forEach((b, i) => {
    if (i % every) return;
    const label = svg("text", { x: PAD_L + i * step, y: CHART_H - 4, class: "tick" });
    label.textContent = new Date(b.start).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    chart.append(label);
  });
}

function barChart(buckets, stats) {
  const chart = svg("svg", {
    viewBox: `0 0 ${CHART_W} ${CHART_H}`, class: "chart bars", role: "img",
    "aria-label": `Requests per bucket by status class, ${buckets.length} buckets`,
  });
  const max = Math.max(1, ...buckets.map((b) => b.total));
  axis(chart, max, false);
  const step = (CHART_W - PAD_L) / buckets.length;
  const scale = (CHART_H - PAD_B - 8) / max;
  buckets.forEach((b, i) => {
    let y = CHART_H - PAD_B;
    const group = svg("g", { class: "bucket" });
    const title = svg("title");
    title.textContent = `${localTime(b.start)} (+${stats.bucketSeconds / 60} min): ` +
      CLASSES.map((k) => `${b[k]} ${k}`).join(", ");
    group.append(title);
    for (const k of CLASSES) {
      if (!b[k]) continue;
      const h = b[k] * scale;
      y -= h;
      group.append(svg("rect", {
        x: PAD_L + i * step + 0.5, y, width: Math.max(1, step - 1), height: h,
        class: `bar c-${k}`, "data-count": b[k], "data-class": k,
      }));
    }
    chart.append(group);
  });
  timeLabels(chart, buckets);
  return chart;
}

function lineChart(buckets) {
  const chart = svg("svg", {
    viewBox: `0 0 ${CHART_W} ${CHART_H}`, class: "chart lines", role: "img",
    "aria-label": "Response time p50 and p99 per bucket",
  });
  const max = Math.max(0.001, ...buckets.map((b) => b.p99 || 0));
  axis(chart, max, true);
  const step = (CHART_W - PAD_L) / buckets.length;
  for (const key of ["p99", "p50"]) {
    let points = "";
    buckets.forEach((b, i) => {
      if (b[key] === null || b[key] === undefined) return;
      const x = PAD_L + i * step + step / 2;
      const y = CHART_H - PAD_B - (b[key] / max) * (CHART_H - PAD_B - 8);
      points += `${x.toFixed(1)},${y.toFixed(1)} `;
      const dot = svg("circle", { cx: x, cy: y, r: 2, class: `dot ${key}` });
      const title = svg("title");
      title.textContent = `${localTime(b.start)}: ${key} ${seconds(b[key])}`;
      dot.append(title);
      chart.append(dot);
    });
    chart.append(svg("polyline", { points: points.trim(), class: `line ${key}` }));
  }
  timeLabels(chart, buckets);
  return chart;
}
