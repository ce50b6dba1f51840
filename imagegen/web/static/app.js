// The imagegen dashboard: polls the JSON API every 2 s and renders it; no build step, no libraries.
"use strict";

const POLL_MS = 2000;
const PER_PAGE = 20;
const TOKEN_KEY = "imagegen.apiToken";
const RECENT = 20; // records in the first view's activity list, newest first
const STRIP_MAX = 12; // thumbnails in the strip of latest images: the first image of each latest done record
// The first view is recent activity across every state; each state's own list is one click away.
const STATES = ["recent", "pending", "queued", "processing", "done", "failed", "deferred", "in_progress"];
const STATE_LABELS = { recent: "recent activity", in_progress: "in progress" };
const SVG_NS = "http://www.w3.org/2000/svg";

const view = { state: "recent", page: 1, search: "", taskId: null, total: 0, counts: {} };
let refreshing = false;
let pollProblem = false; // the problem shown came from polling (cleared by the next good poll)

const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

// Record data is the content site's: only http(s) links become links or images (never javascript: or data:).
function isWebUrl(value) {
  try {
    const url = new URL(value);
    return url.protocol === "http:" || url.protocol === "https:";
  } catch (_) {
    return false;
  }
}

// --- the API ---------------------------------------------------------------------------------------------

class AuthNeeded extends Error {}

async function api(method, path, body) {
  // Every write is JSON, {} when there is nothing to say: the server refuses any other (see README, web API).
  if (method !== "GET" && body === undefined) body = {};
  const headers = { Accept: "application/json" };
  const token = localStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try {
    data = await response.json();
  } catch (_) {
    data = null;
  }
  if (response.status === 401) throw new AuthNeeded((data && data.error) || "token needed");
  if (!response.ok) throw new Error((data && data.error) || `HTTP ${response.status}`);
  return data;
}

function askForToken(message) {
  $("token-form").hidden = false;
  $("token-note").textContent = message || "kept in this browser only";
  $("updated").textContent = "waiting for the API token";
  if (document.activeElement !== $("token-input")) $("token-input").focus();
}

function showProblem(message, fromPoll = false) {
  pollProblem = fromPoll;
  const box = $("problem");
  box.hidden = !message;
  box.textContent = message || "";
}

// --- rendering -------------------------------------------------------------------------------------------

function setNumber(id, value) {
  $(id).textContent = value === null || value === undefined ? "–" : String(value);
}

function renderQueue(queue) {
  const records = queue.records || {};
  view.counts = records;
  for (const name of ["pending", "queued", "processing", "done", "failed"]) setNumber(`count-${name}`, records[name]);
  $("count-failed").classList.toggle("alert", Boolean(records.failed));
  for (const [name, value] of Object.entries(queue.jobs)) setNumber(`jobs-${name}`, value);
  setNumber("workers", queue.workers.length);
  $("streak").textContent = `${queue.consecutive_failures} / ${queue.max_failed}`;
  // Each provider with calls or a daily limit today: "jimeng 4 / 10 · ark 2".
  const spend = queue.spend;
  const shown = spend.providers.filter((p) => p.calls || p.limit !== null);
  $("spend-today").textContent = shown.length
    ? shown.map((p) => `${p.provider} ${p.calls}${p.limit === null ? "" : ` / ${p.limit}`}`).join(" · ")
    : "0";
  $("spend-today").title = `${spend.day} (${spend.timezone}): ${spend.images} images, ${spend.moderated} moderated, ${spend.failed} failed`;

  const paused = queue.paused;
  $("paused-banner").hidden = !paused;
  $("pause-btn").disabled = Boolean(paused);
  $("resume-btn").disabled = !paused;
  if (paused) {
    $("paused-reason").textContent = paused.reason;
    $("paused-since").textContent = `(${paused.source}, since ${new Date(paused.since).toLocaleString()})`;
  }
  const outages = queue.outages || [];
  $("outages").hidden = outages.length === 0 && !queue.records_error;
  $("outages").textContent = [
    ...outages.map((o) => `${o.service} down since ${new Date(o.since).toLocaleTimeString()}: ${o.error}`),
    queue.records_error ? `record counts unavailable: ${queue.records_error}` : "",
  ]
    .filter(Boolean)
    .join(" · ");
  renderChart(queue.throughput);
  renderTabs();
}

function renderChart(throughput) {
  const svg = $("chart");
  svg.replaceChildren();
  const minutes = throughput.minutes;
  const width = 600;
  const height = 100; // the axis; the bars stand between `margin` and it, the labels outside that band
  const margin = 16;
  const plot = height - margin;
  const top = Math.max(1, ...minutes.map((m) => m.done + m.failed));
  const slot = width / minutes.length;
  minutes.forEach((minute, index) => {
    const x = index * slot + 1;
    const doneHeight = (minute.done / top) * plot;
    const failedHeight = (minute.failed / top) * plot;
    for (const [className, y, h, count] of [
      ["done", height - doneHeight, doneHeight, minute.done],
      ["failed", height - doneHeight - failedHeight, failedHeight, minute.failed],
    ]) {
      if (h <= 0) continue;
      const bar = document.createElementNS(SVG_NS, "rect");
      bar.setAttribute("class", className);
      bar.setAttribute("x", x.toFixed(1));
      bar.setAttribute("y", y.toFixed(1));
      bar.setAttribute("width", Math.max(1, slot - 2).toFixed(1));
      bar.setAttribute("height", h.toFixed(1));
      const title = document.createElementNS(SVG_NS, "title");
      title.textContent = `${new Date(minute.minute).toLocaleTimeString()}: ${count} ${className}`;
      bar.appendChild(title);
      svg.appendChild(bar);
    }
  });
  const axis = document.createElementNS(SVG_NS, "line");
  axis.setAttribute("class", "axis");
  for (const [name, value] of [["x1", 0], ["y1", height], ["x2", width], ["y2", height]]) axis.setAttribute(name, value);
  svg.appendChild(axis);
  for (const [x, y, label, anchor] of [
    [0, height + 14, "60 min ago", "start"],
    [width, height + 14, "now", "end"],
    [width, margin - 5, `max ${top}/min`, "end"],
  ]) {
    const text = document.createElementNS(SVG_NS, "text");
    text.setAttribute("x", x);
    text.setAttribute("y", y);
    text.setAttribute("text-anchor", anchor);
    text.textContent = label;
    svg.appendChild(text);
  }
  const rate = throughput.failure_rate === null ? "–" : `${(throughput.failure_rate * 100).toFixed(1)}%`;
  $("hour-figures").textContent = `${throughput.done} done, ${throughput.failed} failed, failure rate ${rate}`;
}

function renderTabs() {
  const tabs = $("tabs");
  if (!tabs.childElementCount) {
    for (const state of STATES) {
      const button = el("button", "");
      button.type = "button";
      button.dataset.state = state;
      button.addEventListener("click", () => {
        view.state = state;
        view.page = 1;
        refresh();
      });
      tabs.appendChild(button);
    }
  }
  for (const button of tabs.children) {
    const state = button.dataset.state;
    const count = view.counts[state];
    button.textContent = (STATE_LABELS[state] || state) + (count === undefined ? "" : ` (${count})`);
    button.setAttribute("aria-pressed", String(state === view.state));
    button.classList.toggle("alert", state === "failed" && Boolean(count));
  }
  $("search-form").hidden = view.state === "recent";
}

function noteOf(item) {
  if (item.phase) return `${item.phase} on ${item.worker}`;
  if (item.scheduled_for) return `next try ${new Date(item.scheduled_for).toLocaleTimeString()}`;
  return item.error || (item.images.length ? `${item.images.length} images` : "");
}

function renderList(page) {
  view.total = page.total;
  const rows = $("task-rows");
  rows.replaceChildren();
  for (const item of page.items) {
    const row = el("tr");
    row.dataset.id = item.id;
    if (item.id === view.taskId) row.classList.add("selected");
    row.appendChild(el("td", item.id)).title = item.id;
    row.appendChild(el("td", item.prompt ?? "")).title = item.prompt ?? "";
    const status = item.status || (item.phase ? "running" : "deferred");
    row.classList.add(`row-${status}`);
    row.appendChild(el("td", status, `status-${status}`));
    row.appendChild(el("td", noteOf(item))).title = item.error || "";
    row.appendChild(el("td", item.updated ? new Date(item.updated).toLocaleTimeString() : "", "muted"));
    row.addEventListener("click", () => openTask(item.id));
    rows.appendChild(row);
  }
  if (!page.items.length) {
    const row = el("tr");
    const cell = el("td", view.search ? "nothing matches" : "nothing here", "muted");
    cell.colSpan = 5;
    row.appendChild(cell);
    rows.appendChild(row);
  }
  const pages = Math.max(1, Math.ceil(page.total / page.per_page));
  $("page-info").textContent =
    view.state === "recent"
      ? `the ${page.items.length} latest changes, newest first`
      : `page ${page.page} of ${pages} · ${page.total} tasks`;
  $("prev-page").disabled = page.page <= 1;
  $("next-page").disabled = page.page >= pages;
}

// Thumbnails (only http(s) URLs) linking to the full images, rebuilt only when the set of URLs changes so
// that polling never reloads them. Each entry: { url, id, label }.
function renderThumbs(box, entries, empty) {
  const wanted = entries.filter((entry) => isWebUrl(entry.url));
  const shown = Array.from(box.querySelectorAll("img")).map((img) => img.getAttribute("src"));
  if (box.childElementCount && shown.join("\n") === wanted.map((entry) => entry.url).join("\n")) return;
  box.replaceChildren();
  for (const entry of wanted) {
    const link = el("a");
    link.href = entry.url;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    link.dataset.id = entry.id;
    link.title = entry.label;
    const img = el("img");
    img.src = entry.url;
    img.alt = entry.label;
    img.loading = "lazy";
    link.appendChild(img);
    box.appendChild(link);
  }
  if (!wanted.length && empty) box.appendChild(el("span", empty, "muted"));
}

// One account's state in words: "out of credits until 00:00:00", "expired since 12:01:02", "healthy".
function accountState(account) {
  if (account.until) return `${account.state} until ${new Date(account.until * 1000).toLocaleString()}`;
  if (account.since) return `${account.state} since ${new Date(account.since * 1000).toLocaleString()}`;
  return account.state;
}

// The accounts card: every provider's accounts, the ones set aside marked (never a key: fingerprints only).
function renderAccounts(accounts) {
  const rows = accounts.map((account) => {
    const row = el("tr");
    row.dataset.fingerprint = account.fingerprint;
    if (account.state !== "healthy" && account.state !== "at its cap") row.className = "account-aside";
    row.appendChild(el("td", account.provider));
    row.appendChild(el("td", account.account));
    row.appendChild(el("td", account.fingerprint, "muted"));
    const state = el("td", accountState(account));
    if (account.reason) state.title = account.reason;
    row.appendChild(state);
    row.appendChild(el("td", account.calls_today + (account.in_flight ? ` (${account.in_flight} in flight)` : "")));
    row.appendChild(el("td", account.credits === null ? "–" : account.credits));
    return row;
  });
  $("account-rows").replaceChildren(...rows);
  const aside = accounts.filter((a) => a.state !== "healthy" && a.state !== "at its cap").length;
  $("accounts-summary").textContent = `${accounts.length} in all${aside ? `, ${aside} set aside` : ""}`;
}

// The strip of latest images: the first image of each of the latest done records, newest first.
function renderStrip(items) {
  const entries = items
    .filter((item) => item.status === "done" && item.images.length)
    .slice(0, STRIP_MAX)
    .map((item) => ({ url: item.images[0], id: item.id, label: item.prompt || item.id }));
  renderThumbs($("thumb-strip"), entries, "no images yet");
}

function fact(list, label, value) {
  if (value === null || value === undefined || value === "") return;
  list.appendChild(el("dt", label));
  list.appendChild(el("dd", value));
}

function seconds(value) {
  return typeof value === "number" ? `${value.toFixed(1)} s` : String(value);
}

// Each stage the job went through: seconds spent (over all its runs) and when it first entered it.
function renderStages(task) {
  const box = $("task-stages");
  box.replaceChildren();
  if (!task.stages || !task.stages.length) return;
  const table = el("table", null, "stages");
  const head = el("tr");
  for (const title of ["stage", "time", "first entered"]) head.appendChild(el("th", title));
  table.appendChild(head);
  for (const timing of task.stages) {
    const row = el("tr");
    row.appendChild(el("td", timing.stage, timing.stage === task.stage ? "status-done" : ""));
    row.appendChild(el("td", seconds(timing.seconds)));
    row.appendChild(el("td", new Date(timing.started).toLocaleTimeString()));
    table.appendChild(row);
  }
  box.appendChild(table);
}

function renderTask(task) {
  $("task-view").hidden = false;
  $("task-id").textContent = task.id;
  const record = task.record;
  $("task-prompt").textContent = record ? record.prompt : "no record in PocketBase";
  const facts = $("task-facts");
  facts.replaceChildren();
  fact(facts, "job", task.state);
  fact(facts, "stage", task.stage && task.stage_since
    ? `${task.stage} since ${new Date(task.stage_since).toLocaleTimeString()}` : task.stage);
  fact(facts, "record", record ? record.status : null);
  fact(facts, "attempts", task.tries);
  fact(facts, "enqueued", task.enqueued_at && new Date(task.enqueued_at).toLocaleString());
  fact(facts, "started", task.started_at && new Date(task.started_at).toLocaleString());
  fact(facts, "finished", task.finished_at && new Date(task.finished_at).toLocaleString());
  fact(facts, "next try", task.scheduled_for && new Date(task.scheduled_for).toLocaleString());
  fact(facts, "took", task.duration_seconds === null ? null : seconds(task.duration_seconds));
  renderStages(task);
  const error = task.error || (record && record.error) || "";
  $("task-error").hidden = !error;
  $("task-error").textContent = error;
  // A done record needs no retry; what makes sense is generating it again, which costs a paid call.
  const done = Boolean(record && record.status === "done");
  $("task-retry-btn").hidden = done;
  $("task-regenerate-btn").hidden = !done;
  const stored = record ? (record.images.length ? record.images : record.imageUrl ? [record.imageUrl] : []) : [];
  const label = `generated image of ${task.id}`;
  renderThumbs($("task-images"), stored.map((url) => ({ url, id: task.id, label })), "");
}

// --- actions ---------------------------------------------------------------------------------------------

function openTask(id) {
  view.taskId = id;
  history.replaceState(null, "", `#task=${encodeURIComponent(id)}`);
  refresh();
}

function closeTask() {
  view.taskId = null;
  $("task-view").hidden = true;
  history.replaceState(null, "", location.pathname);
  refresh();
}

async function act(button, work) {
  button.disabled = true;
  try {
    const result = await work();
    showProblem("");
    return result;
  } catch (error) {
    if (error instanceof AuthNeeded) askForToken(error.message);
    else showProblem(error.message);
    return null;
  } finally {
    button.disabled = false;
    await refresh();
  }
}

function counted(result) {
  if (!result) return;
  const counts = Object.entries(result.counts).map(([name, n]) => `${n} ${name}`);
  $("updated").textContent = counts.length ? counts.join(", ") : "nothing to queue";
}

function wireActions() {
  $("pause-btn").addEventListener("click", (event) => {
    const reason = window.prompt("Why pause the queue?", "paused from the dashboard");
    if (reason === null) return;
    act(event.currentTarget, () => api("POST", "/api/queue/pause", reason.trim() ? { reason: reason.trim() } : {}));
  });
  for (const id of ["resume-btn", "banner-resume-btn"]) {
    $(id).addEventListener("click", (event) => act(event.currentTarget, () => api("POST", "/api/queue/resume")));
  }
  $("retry-failed-btn").addEventListener("click", async (event) => {
    counted(await act(event.currentTarget, () => api("POST", "/api/tasks/retry-failed")));
  });
  $("enqueue-pending-btn").addEventListener("click", async (event) => {
    counted(await act(event.currentTarget, () => api("POST", "/api/tasks/enqueue-pending")));
  });
  $("task-retry-btn").addEventListener("click", (event) => {
    const id = view.taskId;
    if (id) act(event.currentTarget, () => api("POST", `/api/tasks/${encodeURIComponent(id)}/retry`));
  });
  $("task-regenerate-btn").addEventListener("click", async (event) => {
    const id = view.taskId;
    const question = `Generate ${id} again? This makes one more paid jimeng call and replaces its images.`;
    if (!id || !window.confirm(question)) return;
    const result = await act(event.currentTarget, () => api("POST", "/api/tasks", { ids: [id], force: true }));
    if (result) $("updated").textContent = result.results.map((r) => `${r.id} ${r.outcome}`).join(", ");
  });
  $("task-close-btn").addEventListener("click", closeTask);
  $("prev-page").addEventListener("click", () => {
    view.page = Math.max(1, view.page - 1);
    refresh();
  });
  $("next-page").addEventListener("click", () => {
    view.page += 1;
    refresh();
  });
  let typing = null;
  $("search").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => {
      view.search = $("search").value.trim();
      view.page = 1;
      refresh();
    }, 250);
  });
  $("search-form").addEventListener("submit", (event) => event.preventDefault());
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("token-input").value.trim());
    $("token-input").value = "";
    $("token-form").hidden = true;
    refresh();
  });
  $("forget-token-btn").addEventListener("click", () => {
    localStorage.removeItem(TOKEN_KEY);
    refresh();
  });
}

// --- the loop --------------------------------------------------------------------------------------------

async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const params = new URLSearchParams({ state: view.state, page: String(view.page), per_page: String(PER_PAGE) });
    if (view.search) params.set("q", view.search);
    const recent = view.state === "recent";
    const [queue, activity, accounts, page, task] = await Promise.all([
      api("GET", "/api/queue"),
      api("GET", `/api/activity?limit=${RECENT}`),
      api("GET", "/api/accounts"),
      recent ? null : api("GET", `/api/tasks?${params}`),
      view.taskId ? api("GET", `/api/tasks/${encodeURIComponent(view.taskId)}`).catch(taskProblem) : null,
    ]);
    renderQueue(queue);
    renderStrip(activity.items);
    renderAccounts(accounts.accounts);
    renderList(page || { page: 1, per_page: RECENT, total: activity.items.length, items: activity.items });
    if (task) renderTask(task);
    $("token-form").hidden = true;
    $("forget-token-btn").hidden = !localStorage.getItem(TOKEN_KEY);
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    if (pollProblem) showProblem("");
  } catch (error) {
    if (error instanceof AuthNeeded) askForToken(error.message);
    else showProblem(`the API did not answer: ${error.message}`, true);
  } finally {
    refreshing = false;
  }
}

function taskProblem(error) {
  if (error instanceof AuthNeeded) throw error;
  $("task-view").hidden = false;
  $("task-prompt").textContent = error.message;
  for (const id of ["task-facts", "task-stages", "task-images"]) $(id).replaceChildren();
  $("task-error").hidden = true;
  return null;
}

function start() {
  const match = location.hash.match(/^#task=([a-z0-9]+)$/);
  if (match) view.taskId = match[1];
  wireActions();
  renderTabs();
  refresh();
  setInterval(refresh, POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);
