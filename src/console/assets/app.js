// The Gatewarden console. Everything the API returns is shown through textContent:
// key names, subjects and config values come from people other than the operator.
"use strict";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 3000;

// Every call carries the console's header: together with the Origin the browser adds,
// it is what the gateway checks before it takes a change made with the session cookie.
async function api(method, path, body) {
  const init = { method, headers: { "X-Gatewarden-Console": "1" }, credentials: "same-origin" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  let data = null;
  try {
    data = await resp.json();
  } catch (_) {
    data = null;
  }
  if (resp.status === 401 && path.startsWith("/admin/")) {
    showSignIn(false);
  }
  return { ok: resp.ok, status: resp.status, data };
}

function reason(result) {
  if (result.data && typeof result.data.error === "string") {
    return result.data.error;
  }
  return "the gateway answered " + result.status;
}

function show(el, text) {
  el.textContent = text;
  el.hidden = !text;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (className) {
    td.className = className;
  }
  row.appendChild(td);
  return td;
}

function fill(tbody, items, draw, emptyText) {
  tbody.replaceChildren();
  if (items.length === 0) {
    const row = tbody.insertRow();
    const td = cell(row, emptyText, "empty");
    td.colSpan = tbody.parentElement.querySelectorAll("th").length;
    return;
  }
  for (const item of items) {
    draw(tbody.insertRow(), item);
  }
}

function latency(ms, over) {
  if (over) {
    return "> 60 s";
  }
  if (ms === null || ms === undefined) {
    return "–";
  }
  return ms >= 1000 ? "≤ " + ms / 1000 + " s" : "≤ " + ms + " ms";
}

function percent(rate) {
  return (rate * 100).toFixed(rate > 0 && rate < 0.01 ? 2 : 1) + "%";
}

async function loadBackends() {
  const r = await api("GET", "/admin/backends");
  if (!r.ok) {
    return;
  }
  const rows = [];
  for (const up of r.data.upstreams) {
    for (const b of up.backends) {
      rows.push({ upstream: up.name, checked: up.health_check, ...b });
    }
  }
  fill($("backends"), rows, (row, b) => {
    row.dataset.upstream = b.upstream;
    row.dataset.backend = b.address;
    row.dataset.healthy = String(b.healthy);
    cell(row, b.upstream);
    cell(row, b.address);
    const state = b.healthy ? (b.checked ? "healthy" : "in service (not checked)") : "unhealthy";
    cell(row, state, b.healthy ? "good" : "bad");
  }, "No upstreams.");
}

async function loadStats() {
  const r = await api("GET", "/admin/stats");
  if (!r.ok) {
    return;
  }
  const routes = r.data.routes;
  const seconds = routes.length ? routes[0].seconds : 0;
  const span = seconds < 120 ? seconds + " s" : Math.round(seconds / 60) + " min";
  $("window-note").textContent = seconds ? "(last " + span + ")" : "";
  fill($("routes"), routes, (row, s) => {
    row.dataset.route = s.route;
    cell(row, s.route);
    cell(row, s.per_second.toFixed(2));
    cell(row, s.requests);
    cell(row, s.server_errors + " (" + percent(s.server_error_rate) + ")", s.server_errors ? "bad" : "");
    cell(row, s.client_errors + " (" + percent(s.client_error_rate) + ")");
    cell(row, latency(s.p50_ms, s.p50_over_max));
    cell(row, latency(s.p99_ms, s.p99_over_max));
  }, "No routes.");
}

async function loadKeys() {
  const r = await api("GET", "/admin/keys");
  if (!r.ok) {
    show($("key-error"), reason(r));
    $("keys").replaceChildren();
    return;
  }
  fill($("keys"), r.data.keys, (row, k) => {
    row.dataset.id = k.id;
    row.dataset.name = k.name;
    row.dataset.status = k.status;
    cell(row, k.name);
    cell(row, k.prefix);
    cell(row, k.role);
    cell(row, k.subject || "");
    cell(row, k.status, k.status === "active" ? "good" : "");
    cell(row, k.last_used_at || "never");
    const td = cell(row, "");
    if (k.status === "active") {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "revoke";
      button.textContent = "Revoke";
      button.addEventListener("click", () => revoke(k.id));
      td.appendChild(button);
    }
  }, "No keys.");
}

async function revoke(id) {
  const r = await api("DELETE", "/admin/keys/" + encodeURIComponent(id));
  show($("key-error"), r.ok ? "" : reason(r));
  await loadKeys();
}

async function createKey(event) {
  event.preventDefault();
  const body = { name: $("key-name").value.trim(), role: $("key-role").value };
  const subject = $("key-subject").value.trim();
  const expires = $("key-expires").value.trim();
  if (subject) {
    body.subject = subject;
  }
  if (expires) {
    body.expires = expires;
  }
  const r = await api("POST", "/admin/keys", body);
  if (r.ok) {
    show($("key-error"), "");
    $("created-key").textContent = r.data.key;
    $("created").hidden = false;
    $("key-form").reset();
  } else {
    $("created").hidden = true;
    show($("key-error"), reason(r));
  }
  await loadKeys();
}

async function loadUsage() {
  const r = await api("GET", "/admin/usage");
  if (!r.ok) {
    show($("usage-error"), reason(r));
    return;
  }
  show($("usage-error"), "");
  fill($("usage"), r.data.rows, (row, u) => {
    row.dataset.subject = u.subject;
    cell(row, u.subject);
    cell(row, u.route);
    cell(row, u.key_id);
    cell(row, u.requests);
    cell(row, u.responses["4xx"]);
    cell(row, u.responses["5xx"]);
    cell(row, u.tokens.total);
  }, "Nothing yet today.");
}

async function loadConfig() {
  const r = await api("GET", "/admin/config");
  if (r.ok) {
    $("config").textContent = JSON.stringify(r.data, null, 2);
  }
}

async function reload() {
  const button = $("reload");
  button.disabled = true;
  show($("reload-result"), "");
  show($("reload-error"), "");
  const r = await api("POST", "/admin/reload");
  button.disabled = false;
  if (r.ok) {
    show($("reload-result"), "Reloaded: configuration generation " + r.data.config_generation + ".");
    await Promise.all([loadConfig(), loadBackends(), loadStats(), loadKeys()]);
  } else {
    const problems = r.data && r.data.problems ? "\n" + r.data.problems : "";
    show($("reload-error"), reason(r) + problems);
  }
}

async function signOut() {
  await api("POST", "/ui/sign-out");
  location.replace("/ui/");
}

let timer = null;

// What `/ui/session` last said: the ways in the sign-in offers.
let ways = { key_sign_in: true, login: null };

function showSignIn(failed, refused) {
  if (timer !== null) {
    clearInterval(timer);
    timer = null;
  }
  $("console").hidden = true;
  $("sign-out").hidden = true;
  $("signed-in-as").hidden = true;
  $("signin").hidden = false;
  show($("signin-refused"), refused || "");
  $("signin-form").hidden = !ways.key_sign_in;
  $("signin-error").hidden = !failed;
  $("login-way").hidden = !ways.login;
  if (ways.login) {
    $("login-name").textContent = ways.login.name;
    const link = $("login-link");
    link.hidden = !ways.login.url;
    if (ways.login.url) {
      link.href = ways.login.url;
    }
  }
  if (ways.key_sign_in) {
    $("admin-key").focus();
  }
}

async function start() {
  $("key-form").addEventListener("submit", createKey);
  $("reload").addEventListener("click", reload);
  $("sign-out").addEventListener("click", signOut);
  const failed = new URLSearchParams(location.search).get("signin") === "failed";
  if (failed) {
    history.replaceState(null, "", "/ui/");
  }
  const session = await api("GET", "/ui/session");
  if (session.ok && session.data) {
    ways = { key_sign_in: !!session.data.key_sign_in, login: session.data.login || null };
  }
  if (!session.ok || !session.data.signed_in) {
    showSignIn(failed, session.data && session.data.refused);
    return;
  }
  $("signin").hidden = true;
  $("console").hidden = false;
  $("sign-out").hidden = false;
  show($("signed-in-as"), "Signed in as " + session.data.as);
  await Promise.all([loadBackends(), loadStats(), loadKeys(), loadUsage(), loadConfig()]);
  document.body.dataset.ready = "true";
  timer = setInterval(() => {
    loadBackends();
    loadStats();
    loadUsage();
  }, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
