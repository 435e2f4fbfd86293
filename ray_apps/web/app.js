// rayrec web page: plain JS over the HTTP API (no build step, nothing loaded from elsewhere).
"use strict";

const KEY_STORAGE = "rayrec.apiKey";
const METRICS_PORT = 8080; // `ray start --metrics-export-port` in ray_apps/local.py

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  customer: "",
  recs: [], // article ids currently shown, best first
  details: new Map(), // article id -> display attributes from /v1/items
};

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------
// HTTP

class ApiError extends Error {
  constructor(method, path, status, message) {
    super(message);
    this.method = method;
    this.path = path;
    this.status = status;
  }
  describe() {
    const what = this.status ? `HTTP ${this.status}` : "no answer";
    const hint = this.status === 401 ? " (enter the API key above)" : "";
    return `${this.method} ${this.path} → ${what}: ${this.message}${hint}`;
  }
}

function errorMessage(data, text, fallback) {
  if (data && typeof data.message === "string") return data.message;
  if (data && data.detail !== undefined) {
    return typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
  }
  return (text || fallback || "").slice(0, 500);
}

async function api(method, path, body) {
  const headers = {};
  if (state.key) headers["X-API-Key"] = state.key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const t0 = performance.now();
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new ApiError(method, path, 0, `network error: ${e.message}`);
  }
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = null;
  }
  if (!resp.ok) throw new ApiError(method, path, resp.status, errorMessage(data, text, resp.statusText));
  return { data, ms: performance.now() - t0 };
}

function uuid4() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16)); // randomUUID needs a secure context
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// ---------------------------------------------------------------------------------------------
// DOM helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function showError(err) {
  const text = err instanceof ApiError ? err.describe() : `error: ${err.message || err}`;
  $("error-text").textContent = text;
  $("error").hidden = false;
  console.error(err);
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

// Run a user action: clear the last error, show a new one plainly.
async function action(fn) {
  clearError();
  try {
    await fn();
  } catch (e) {
    showError(e);
  }
}

function fmt(x, digits) {
  return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–";
}

// ---------------------------------------------------------------------------------------------
// Data

function requestContext() {
  const date = $("date").value;
  return date ? { date } : {};
}

function kValue() {
  const k = parseInt($("k").value, 10);
  return Number.isInteger(k) ? Math.min(100, Math.max(1, k)) : 12;
}

async function loadDetails(ids) {
  const missing = [...new Set(ids)].filter((a) => !state.details.has(a));
  for (let i = 0; i < missing.length; i += 100) {
    const chunk = missing.slice(i, i + 100);
    const { data } = await api("GET", `/v1/items?ids=${encodeURIComponent(chunk.join(","))}`);
    for (const a of chunk) state.details.set(a, (data.items || {})[a] || null);
  }
}

// ---------------------------------------------------------------------------------------------
// Cards

function cardFacts(d) {
  if (!d) return [el("div", { class: "facts muted" }, "no details in the online store")];
  return [
    el("div", { class: "facts" }, `${d.product_type_name ?? "?"} · ${d.colour_group_name ?? "?"}`),
    el("div", { class: "facts muted" }, `${d.index_group_name ?? "?"} · price ${fmt(d.price, 4)}`),
  ];
}

// One article card; `opts`: score, stage (what put it here), badge, withActions.
function card(articleId, opts) {
  const d = state.details.get(articleId);
  const actions = opts.withActions
    ? el("div", { class: "actions" },
        el("button", { type: "button", class: "view", onclick: () => action(() => sendEvent(articleId, "view")) }, "view"),
        el("button", { type: "button", class: "buy", onclick: () => action(() => sendEvent(articleId, "purchase")) }, "buy"),
        el("button", { type: "button", class: "similar", onclick: () => action(() => showSimilar(articleId)) }, "similar"))
    : el("div", { class: "actions" },
        el("button", { type: "button", class: "similar", onclick: () => action(() => showSimilar(articleId)) }, "similar"));
  return el("article", { class: `card${opts.badge ? " changed" : ""}`, "data-article-id": articleId },
    el("div", { class: "card-head" },
      el("span", { class: "name", title: d?.detail_desc || "" }, d?.prod_name || articleId),
      opts.badge ? el("span", { class: "badge" }, opts.badge) : null),
    ...cardFacts(d),
    el("div", { class: "meta" },
      el("span", { class: "score" }, `score ${fmt(opts.score, 3)}`),
      el("span", { class: `stage stage-${opts.stage.split(" ")[0]}` }, opts.stage)),
    el("div", { class: "aid muted" }, articleId),
    actions);
}

function renderCards(container, nodes, emptyText) {
  container.replaceChildren(...(nodes.length ? nodes : [el("p", { class: "muted" }, emptyText)]));
  container.dataset.version = String(Number(container.dataset.version || "0") + 1);
}

// What changed since the last list: "new" or a move up/down.
function changeBadge(articleId, pos, before) {
  if (!before.length) return null;
  const old = before.indexOf(articleId);
  if (old < 0) return "new";
  if (old > pos) return `↑${old - pos}`;
  if (old < pos) return `↓${pos - old}`;
  return null;
}

// ---------------------------------------------------------------------------------------------
// Latency panel

const STAGES = [
  ["encode_ms", "encode (query tower + features)"],
  ["retrieve_ms", "retrieve (index)"],
  ["search_ms", "search (index)"],
  ["filter_rank_ms", "filter + rank"],
  ["rank_stage_ms", "of which in the ranker", "sub"],
  ["popular_ms", "popular fallback"],
  ["total_ms", "total in the app"],
];
const COUNTS = [
  ["n_retrieved", "retrieved"],
  ["n_after_filter", "after the filters"],
  ["n_ranked", "ranked"],
];

function renderLatency(title, debug, clientMs) {
  const rows = [];
  for (const [key, label, cls] of STAGES) {
    if (typeof debug[key] === "number") rows.push(row(label, `${fmt(debug[key], 1)} ms`, key, cls));
  }
  rows.push(row("round trip (browser)", `${fmt(clientMs, 1)} ms`, "client_ms"));
  for (const [key, label] of COUNTS) {
    if (debug[key] !== undefined) rows.push(row(label, String(debug[key]), key));
  }
  for (const [rule, n] of Object.entries(debug.filter_removed || {})) {
    rows.push(row(`removed: ${rule}`, String(n), `removed-${rule}`));
  }
  if (debug.fallback) rows.push(row("fallback", debug.fallback, "fallback"));
  if (Array.isArray(debug.fetches) && debug.fetches.length > 1) {
    rows.push(row("retrieval rounds", String(debug.fetches.length), "fetches"));
  }
  $("latency").replaceChildren(el("div", { class: "muted" }, title), el("table", {}, el("tbody", {}, rows)));
}

function row(label, value, key, cls) {
  return el("tr", { "data-key": key, class: cls }, el("th", {}, label), el("td", {}, value));
}

// ---------------------------------------------------------------------------------------------
// Customers and recommendations

async function loadCustomerList() {
  const { data } = await api("GET", "/v1/customers?n=20");
  const select = $("customer-select");
  select.replaceChildren(el("option", { value: "" }, "— pick one —"),
    ...data.customer_ids.map((c) => el("option", { value: c }, `${c.slice(0, 12)}…`)));
  if (state.customer) select.value = state.customer;
}

async function chooseCustomer(customerId) {
  customerId = customerId.trim();
  if (!customerId) throw new Error("pick a customer or type an id");
  if (customerId !== state.customer) state.recs = [];
  state.customer = customerId;
  $("customer-input").value = customerId;
  await Promise.all([loadProfile(), refreshRecs()]);
}

async function loadProfile() {
  const { data } = await api("GET", `/v1/customers/${encodeURIComponent(state.customer)}`);
  const p = data.profile || {};
  const recent = (data.purchased || []).slice(0, 8);
  await loadDetails(recent);
  $("profile").replaceChildren(
    el("div", { class: "facts" },
      el("span", { class: "pill", id: "age-group" }, `age group ${p.age_group ?? "unknown"}`),
      el("span", { class: "pill" }, `age ${p.age ?? "?"}`),
      el("span", { class: "pill", id: "club-status" }, `club ${p.club_member_status ?? "unknown"}`),
      el("span", { class: "pill" }, `${data.n_purchases ?? 0} purchases`),
      data.known ? null : el("span", { class: "pill warn" }, "unknown customer: popular articles"),
      data.degraded ? el("span", { class: "pill warn" }, "store unavailable") : null),
    el("div", { class: "aid muted" }, data.customer_id));
  $("purchases").replaceChildren(...(recent.length ? recent.map(mini) : [el("span", { class: "muted" }, "none")]));
  $("profile-section").hidden = false;
}

function mini(articleId) {
  const d = state.details.get(articleId);
  return el("div", { class: "mini", "data-article-id": articleId, title: articleId },
    el("div", { class: "name" }, d?.prod_name || articleId),
    el("div", { class: "muted" }, d ? `${d.product_type_name} · ${d.colour_group_name}` : ""));
}

async function fetchRecs() {
  const body = { customer_id: state.customer, k: kValue(), context: requestContext(), debug: true };
  const { data, ms } = await api("POST", "/v1/recommend", body);
  await loadDetails(data.items.map((i) => i.article_id));
  return { data, ms };
}

function renderRecs(data, ms) {
  const before = state.recs;
  const stage = data.source === "popular" ? `popular (${data.debug?.fallback || "fallback"})` : "ranked";
  const cards = data.items.map((it, pos) =>
    card(it.article_id, { score: it.score, stage, badge: changeBadge(it.article_id, pos, before), withActions: true }));
  state.recs = data.items.map((i) => i.article_id);
  $("recs-meta").textContent = `${data.items.length} from ${data.source}` +
    (data.degraded ? " (degraded)" : "") + (data.warnings?.length ? ` · ${data.warnings.join("; ")}` : "");
  renderCards($("recs"), cards, "No recommendations.");
  renderLatency(`POST /v1/recommend · ${data.model?.run ?? ""} index v${data.model?.index_version ?? "?"}`,
    data.debug || {}, ms);
}

async function refreshRecs() {
  const { data, ms } = await fetchRecs();
  renderRecs(data, ms);
  return ms;
}

// ---------------------------------------------------------------------------------------------
// Events: send, then refresh and show what changed and how long it took

async function sendEvent(articleId, type) {
  if (!state.customer) throw new Error("pick a customer first");
  const name = state.details.get(articleId)?.prod_name || articleId;
  const t0 = performance.now();
  const ev = { event_id: uuid4(), customer_id: state.customer, article_id: articleId, type };
  const { data: evResp, ms: evMs } = await api("POST", "/v1/events", ev);
  const { data, ms: recMs } = await fetchRecs();
  const total = performance.now() - t0;
  renderRecs(data, recMs);
  const stillThere = data.items.some((i) => i.article_id === articleId);
  const applied = evResp.results?.[0]?.applied;
  $("rtt").textContent = `${type} “${name}” → event ${fmt(evMs, 0)} ms + refresh ${fmt(recMs, 0)} ms` +
    ` = round trip ${fmt(total, 0)} ms` + (type === "purchase" && !stillThere ? " · bought article removed" : "") +
    (applied === false ? " · event seen before (not applied again)" : "");
  $("rtt").dataset.ms = String(Math.round(total));
  logEvent(`${type} ${name}: ${fmt(total, 0)} ms`);
  if (type === "purchase") await loadProfile();
}

function logEvent(text) {
  const log = $("event-log");
  log.prepend(el("li", {}, `${new Date().toLocaleTimeString()} ${text}`));
  while (log.children.length > 10) log.lastChild.remove();
}

// ---------------------------------------------------------------------------------------------
// Search and similar articles

async function search(query) {
  query = query.trim();
  if (!query) throw new Error("type something to search for");
  const body = { query, k: kValue(), context: requestContext(), debug: true };
  if (state.customer) body.customer_id = state.customer;
  const { data, ms } = await api("POST", "/v1/search", body);
  await loadDetails(data.items.map((i) => i.article_id));
  const stage = state.customer ? "search (personalised)" : "search";
  renderCards($("search-results"),
    data.items.map((it) => card(it.article_id, { score: it.score, stage, withActions: !!state.customer })),
    "Nothing found.");
  $("search-meta").textContent = `“${query}”: ${data.items.length} articles`;
  $("search-section").hidden = false;
  renderLatency(`POST /v1/search “${query}”`, data.debug || {}, ms);
}

async function showSimilar(articleId) {
  const { data, ms } = await api("GET", `/v1/items/${encodeURIComponent(articleId)}/similar?k=${kValue()}`);
  await loadDetails([articleId, ...data.items.map((i) => i.article_id)]);
  $("similar-title").textContent = state.details.get(articleId)?.prod_name || articleId;
  renderCards($("similar"),
    data.items.map((it) => card(it.article_id, { score: it.score, stage: "similar (index)", withActions: !!state.customer })),
    "No similar articles.");
  $("similar-section").hidden = false;
  $("similar-section").scrollIntoView({ behavior: "smooth", block: "nearest" });
  renderLatency(`GET /v1/items/${articleId}/similar`, {}, ms);
}

// ---------------------------------------------------------------------------------------------
// Wiring

function today() {
  const d = new Date();
  return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, "0")}-${String(d.getDate()).padStart(2, "0")}`;
}

function showKeyState() {
  $("key-state").textContent = state.key ? "key set for this tab" : "no key";
}

function wire() {
  $("date").value = today();
  $("api-key").value = state.key;
  $("metrics-link").href = `${location.protocol}//${location.hostname}:${METRICS_PORT}/metrics`;
  showKeyState();
  $("error-close").addEventListener("click", clearError);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    if (state.key) sessionStorage.setItem(KEY_STORAGE, state.key);
    else sessionStorage.removeItem(KEY_STORAGE);
    showKeyState();
    action(async () => {
      await loadCustomerList();
      if (state.customer) await chooseCustomer(state.customer);
    });
  });
  $("customer-select").addEventListener("change", (e) => {
    if (e.target.value) action(() => chooseCustomer(e.target.value));
  });
  $("customer-form").addEventListener("submit", (e) => {
    e.preventDefault();
    action(() => chooseCustomer($("customer-input").value));
  });
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    action(() => search($("search-input").value));
  });
  $("similar-close").addEventListener("click", () => { $("similar-section").hidden = true; });
  action(loadCustomerList);
}

document.addEventListener("DOMContentLoaded", wire);
