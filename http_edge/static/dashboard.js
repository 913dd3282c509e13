// The jetsource dashboard: renders each snapshot the edge sends on /dashboard/events (server-sent
// events) and keeps a minute of rates for the charts. No framework, no build step; every value
// from the system goes into the page as text (never as HTML).
"use strict";

const HISTORY = 60; // points per chart
const series = new Map(); // chart key -> [values]
let previous = null; // the last snapshot's counters, for rates

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "width") node.style.width = v; // through the CSSOM: the CSP allows no style attributes
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  return node;
}

function num(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return Number(value).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function clock(iso) {
  const t = Date.parse(iso);
  return Number.isNaN(t) ? iso : new Date(t).toLocaleTimeString();
}

function td(value, cls) { return el("td", cls ? { class: cls } : {}, value); }

function fill(id, rows, empty, columns) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: String(columns) }, empty))]));
}

function push(key, value) {
  const points = series.get(key) || [];
  points.push(Math.max(0, value || 0));
  while (points.length > HISTORY) points.shift();
  series.set(key, points);
  return points;
}

function spark(points) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", `0 0 ${HISTORY - 1} 24`);
  svg.setAttribute("preserveAspectRatio", "none");
  const top = Math.max(1, ...points);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  const offset = HISTORY - points.length;
  line.setAttribute("points", points.map((v, i) => `${i + offset},${(23 - (v / top) * 22).toFixed(1)}`).join(" "));
  svg.append(line);
  const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
  title.textContent = `max ${num(top, 1)}/s`;
  svg.append(title);
  return svg;
}

function rate(key, now, value, seconds) {
  if (!previous || !(key in previous.counters) || seconds <= 0) return null;
  const delta = value - previous.counters[key];
  return delta < 0 ? null : delta / seconds; // a restarted instance starts its counters again
}

function sectionError(id, section) {
  if (section && section.error) {
    const table = document.getElementById(id);
    const body = table ? table.querySelector("tbody") : null;
    const cols = table ? table.querySelectorAll("th").length : 1;
    const row = el("tr", {}, el("td", { class: "section-error", colspan: String(cols) }, `unavailable: ${section.error}`));
    if (body) body.replaceChildren(row);
    return true;
  }
  return false;
}

function render(snap) {
  const counters = {};
  const seconds = previous ? snap.time - previous.time : 0;

  // Services: instances and totals per name, rates from the counters' deltas.
  const services = new Map();
  const stores = new Map(); // stream -> {writes, commands}
  const projections = new Map(); // projector name -> {checkpoint, lag}
  if (!sectionError("services", snap.services)) {
    for (const svc of snap.services) {
      const s = services.get(svc.name) || { ids: new Set(), requests: 0, errors: 0, time: 0 };
      s.ids.add(svc.id);
      for (const ep of svc.endpoints || []) {
        s.requests += ep.num_requests || 0;
        s.errors += ep.num_errors || 0;
        s.time += ep.processing_time || 0;
        const data = ep.data || {};
        for (const st of data.store || []) {
          const t = stores.get(st.stream) || { writes: 0, commands: 0 };
          t.writes += st.writes; t.commands += st.commands;
          stores.set(st.stream, t);
        }
        for (const p of data.projection || []) {
          const known = projections.get(p.name);
          if (!known || p.checkpoint > known.checkpoint) projections.set(p.name, p);
        }
      }
      services.set(svc.name, s);
    }
    const rows = [];
    for (const [name, s] of [...services.entries()].sort()) {
      counters[`srv:${name}:req`] = s.requests;
      counters[`srv:${name}:err`] = s.errors;
      counters[`srv:${name}:time`] = s.time;
      const reqs = rate(`srv:${name}:req`, snap.time, s.requests, seconds);
      const errs = rate(`srv:${name}:err`, snap.time, s.errors, seconds);
      const dt = previous && previous.counters[`srv:${name}:time`] !== undefined ? s.time - previous.counters[`srv:${name}:time`] : null;
      const dn = previous && previous.counters[`srv:${name}:req`] !== undefined ? s.requests - previous.counters[`srv:${name}:req`] : null;
      const avg = dt !== null && dn > 0 && dt >= 0 ? dt / dn / 1e6 : null;
      rows.push(el("tr", { dataset: { service: name } }, td(name), td(s.ids.size, "num"), td(num(reqs, 1), "num"),
        td(num(errs, 1), "num"), td(num(avg, 2), "num"), el("td", {}, spark(push(`srv:${name}`, reqs)))));
    }
    fill("services", rows, "no service answers $SRV.STATS", 6);
  }

  // Streams: append rate from the last sequence, batch size from the actors' store counters.
  if (!sectionError("streams", snap.streams)) {
    const rows = [];
    for (const st of snap.streams) {
      if (st.error) { rows.push(el("tr", {}, td(st.stream), el("td", { class: "section-error", colspan: "4" }, st.error))); continue; }
      counters[`stream:${st.stream}`] = st.last_seq;
      const appended = rate(`stream:${st.stream}`, snap.time, st.last_seq, seconds);
      const store = stores.get(st.stream);
      let batch = null;
      if (store) {
        counters[`writes:${st.stream}`] = store.writes;
        counters[`commands:${st.stream}`] = store.commands;
        if (previous && previous.counters[`writes:${st.stream}`] !== undefined) {
          const w = store.writes - previous.counters[`writes:${st.stream}`];
          const c = store.commands - previous.counters[`commands:${st.stream}`];
          batch = w > 0 && c >= 0 ? c / w : null;
        }
      }
      rows.push(el("tr", { dataset: { stream: st.stream } }, td(st.stream), td(num(st.messages), "num"), td(num(appended, 1), "num"),
        td(num(batch, 1), "num"), el("td", {}, spark(push(`stream:${st.stream}`, appended)))));
    }
    fill("streams", rows, "no streams", 5);
  }

  // Projections: what each read model's projectors report through their query service.
  fill("projections", [...projections.values()].sort((a, b) => a.name.localeCompare(b.name)).map((p) =>
    el("tr", { dataset: { projection: p.name } }, td(p.name), td(num(p.checkpoint), "num"), td(num(p.lag), "num"))),
    "no projector reports (is the projector running?)", 3);

  fill("circuits", (snap.circuits || []).map((c) => el("tr", { dataset: { subject: c.subject } }, td(c.subject),
    el("td", { class: `state-${c.state}` }, c.state.replace("_", "-")), td(c.failures, "num"),
    td(c.retry_after_s === null ? "" : `${c.retry_after_s} s`, "num"))), "no requests yet", 4);

  // Task queues by priority.
  if (snap.task_stats && !sectionError("queues", snap.task_stats)) {
    const stats = snap.task_stats;
    const priorities = ["high", "normal", "low"];
    fill("queues", priorities.map((p) => el("tr", { dataset: { priority: p } }, td(p),
      td(num((stats.waiting_by_priority || {})[p] || 0), "num"),
      td((stats.oldest_waiting_s_by_priority || {})[p] !== undefined ? `${num(stats.oldest_waiting_s_by_priority[p], 1)} s` : "–", "num"))),
      "", 3);
  }

  if (snap.running && !sectionError("running", snap.running)) {
    fill("running", snap.running.items.map((t) => el("tr", { dataset: { taskId: t.task_id } }, td(t.task_id), td(t.type), td(t.worker || ""),
      el("td", {}, el("span", { class: "bar", title: t.progress_message || "" },
        el("span", { width: `${Math.max(0, Math.min(100, t.progress || 0))}%` })),
        ` ${num(t.progress || 0)}% `, el("span", { class: "progress-message" }, t.progress_message || "")))),
      "no task is running", 4);
  }

  if (snap.dead && !sectionError("dead", snap.dead)) {
    fill("dead", snap.dead.items.map((t) => el("tr", { dataset: { taskId: t.task_id } }, td(t.task_id), td(t.type),
      td(`${t.attempt}/${t.max_attempts}`, "num"), td(t.error || "", "error"),
      el("td", {}, el("button", { type: "button", class: "retry", onclick: () => retry(t.task_id) }, "Retry")))),
      "no dead letters", 5);
  }

  const parked = document.getElementById("parked");
  if (snap.parked && snap.parked.error) parked.replaceChildren(el("p", { class: "section-error" }, `unavailable: ${snap.parked.error}`));
  else if (snap.parked && snap.parked.count) {
    parked.replaceChildren(
      el("p", {}, `${snap.parked.count} parked: `, Object.entries(snap.parked.by_reader).map(([r, n]) => `${r} ${n}`).join(", "),
        " — see `jetsource projections parked`"),
      el("table", {}, el("tbody", {}, ...snap.parked.first.map((p) => el("tr", {}, td(p.reader), td(p.stream), td(p.seq, "num"))))));
  } else parked.replaceChildren(el("p", { class: "empty" }, "none parked"));

  renderRecent(snap);
  previous = { time: snap.time, counters };
  document.getElementById("updated").textContent = `updated ${new Date(snap.time * 1000).toLocaleTimeString()}`;
}

function renderRecent(snap) {
  const holder = document.getElementById("recent");
  const sections = [];
  for (const r of snap.recent || []) {
    const page = snap[`recent:${r.context}`];
    const rows = page && page.items ? page.items.map((item) => {
      const id = item[r.id_field];
      return el("tr", { dataset: { id } },
        el("td", {}, el("a", { class: "link", href: "#", onclick: (e) => { e.preventDefault(); history(r, id); } }, id)),
        td(item.status || ""), td(item.version ?? "", "num"), td(clock(item.updated_at || item.finished_at || item.submitted_at || "")));
    }) : [el("tr", {}, el("td", { class: "section-error", colspan: "4" }, page && page.error ? `unavailable: ${page.error}` : ""))];
    sections.push(el("section", { id: `recent-${r.context}` }, el("h2", {}, `Recent ${r.context}`),
      el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, r.id_field), el("th", {}, "status"), el("th", {}, "version"), el("th", {}, "time"))),
        el("tbody", {}, ...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty", colspan: "4" }, "none yet"))])))));
  }
  holder.replaceChildren(...sections);
}

async function history(recent, id) {
  const panel = document.getElementById("history");
  document.getElementById("history-of").textContent = `${recent.context} ${id}`;
  const list = document.getElementById("history-events");
  list.replaceChildren(el("li", { class: "empty" }, "loading…"));
  panel.hidden = false;
  const response = await fetch(`${recent.prefix}/${encodeURIComponent(id)}/events?limit=200`, { credentials: "same-origin" });
  const body = await response.json();
  if (!response.ok) { list.replaceChildren(el("li", { class: "section-error" }, body.error ? body.error.message : response.statusText)); return; }
  list.replaceChildren(...body.events.map((e) => el("li", { dataset: { seq: e.seq } },
    `#${e.seq} ${e.time} `, el("strong", {}, e.type), e.trace_id ? ` trace ${e.trace_id}` : "",
    el("pre", {}, JSON.stringify(e.event)))));
  panel.scrollIntoView({ behavior: "smooth", block: "nearest" });
}

async function retry(taskId) {
  const notice = document.getElementById("notice");
  notice.textContent = `retrying ${taskId}…`;
  const response = await fetch(`/tasks/${encodeURIComponent(taskId)}/retry`, {
    method: "POST", credentials: "same-origin", body: "{}",
    headers: { "Content-Type": "application/json", "X-Jetsource-Dashboard": "1", "Idempotency-Key": `dashboard-retry:${taskId}:${Date.now()}` },
  });
  const body = await response.json().catch(() => ({}));
  notice.textContent = response.ok ? `${taskId}: ${body.status || "retried"}` : `${taskId}: ${body.error ? body.error.message : response.statusText}`;
}

function connect() {
  const feed = document.getElementById("feed");
  const source = new EventSource("/dashboard/events");
  source.onopen = () => { feed.textContent = "live"; feed.className = "feed up"; };
  source.onmessage = (event) => render(JSON.parse(event.data));
  source.onerror = () => { feed.textContent = "reconnecting…"; feed.className = "feed down"; };
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("history-close").addEventListener("click", () => { document.getElementById("history").hidden = true; });
  connect();
});
