// dispatcher dashboard: auto-refresh of the overview (with its chart) and of a send's state.
// No framework, nothing from the network but our own JSON; data goes into the page via textContent only.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function fetchJson(url) {
  return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } }).then((r) => {
    if (r.status === 401) { window.location.reload(); throw new Error("login required"); }
    if (!r.ok) throw new Error("HTTP " + r.status);
    return r.json();
  });
}

function drawChart(svg, points) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const width = 640, height = 180, left = 40, bottom = 20, top = 10;
  const max = Math.max(1, ...points.map((p) => p.n));
  const slot = (width - left) / Math.max(points.length, 1);
  svg.appendChild(svgEl("line", { x1: left, y1: height - bottom, x2: width, y2: height - bottom, class: "axis" }));
  svg.appendChild(svgEl("text", { x: left - 6, y: top + 8, class: "tick", "text-anchor": "end" }, String(max)));
  svg.appendChild(svgEl("text", { x: left - 6, y: height - bottom, class: "tick", "text-anchor": "end" }, "0"));
  svg.appendChild(svgEl("text", { x: left, y: height - 4, class: "tick" }, "-" + points.length + " min"));
  svg.appendChild(svgEl("text", { x: width, y: height - 4, class: "tick", "text-anchor": "end" }, "now"));
  points.forEach((p, i) => {
    const h = ((height - bottom - top) * p.n) / max;
    const bar = svgEl("rect", {
      x: left + i * slot + 1, y: height - bottom - h, width: Math.max(slot - 2, 1), height: h, class: "bar",
      "data-n": p.n,
    });
    bar.appendChild(svgEl("title", {}, new Date(p.t * 1000).toLocaleTimeString() + ": " + p.n));
    svg.appendChild(bar);
  });
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function renderOverview(root, data) {
  document.getElementById("updated").textContent = new Date(data.generated_at * 1000).toLocaleTimeString();
  root.querySelector('[data-field="delivered_last_hour"]').textContent = data.delivered_last_hour;
  for (const [state, n] of Object.entries(data.states)) {
    const el = root.querySelector('[data-state="' + state + '"]');
    if (el) el.textContent = n;
  }
  for (const q of data.queues) {
    const row = root.querySelector('tr[data-queue="' + q.name + '"]');
    if (!row) continue;
    for (const col of ["waiting", "scheduled", "started", "rq_failed"]) {
      row.querySelector('[data-col="' + col + '"]').textContent = q[col];
    }
    for (const state of Object.keys(q.states)) {
      const td = row.querySelector('[data-state-col="' + state + '"]');
      if (td) td.textContent = q.states[state];
    }
  }
  const body = document.querySelector("#workers tbody");
  body.replaceChildren();
  for (const w of data.workers) {
    const tr = document.createElement("tr");
    tr.append(cell(w.name), cell(w.hostname + " / " + w.pid), cell(w.state), cell(w.queues.join(", ")), cell(w.routes.join("; ")),
      cell(w.current_job || ""), cell(w.successful + " / " + w.failed), cell(w.heartbeat_age + "s ago"));
    body.appendChild(tr);
  }
  if (!data.workers.length) {
    const tr = document.createElement("tr");
    const td = cell("No live worker.");
    td.colSpan = 8;
    tr.appendChild(td);
    body.appendChild(tr);
  }
  document.getElementById("worker-count").textContent = data.workers.length;
  drawChart(document.getElementById("chart"), data.chart);
}

function startOverview(root) {
  const url = root.dataset.source;
  const tick = () => fetchJson(url).then((data) => renderOverview(root, data)).catch(() => {});
  tick();
  window.setInterval(tick, Number(root.dataset.interval) || 5000);
}

function startSend(card) {
  if (card.dataset.final === "true") return;
  const timer = window.setInterval(() => {
    fetchJson(card.dataset.stateUrl).then((data) => {
      if (data.state !== card.dataset.state) {
        window.clearInterval(timer);
        const badge = document.getElementById("state");
        badge.textContent = data.state;
        badge.className = "badge state-" + data.state;
        window.location.reload();  // show the new outcomes, history and transcript
      }
    }).catch(() => {});
  }, 1500);
}

document.addEventListener("DOMContentLoaded", () => {
  const overview = document.getElementById("overview");
  if (overview) startOverview(overview);
  const send = document.getElementById("send");
  if (send) startSend(send);
});
