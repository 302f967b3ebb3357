// aura-proxy dashboard: renders the snapshots of /dashboard/events.
// Plain JavaScript, no build step, no library: the charts are SVG polylines.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const form = $("filters");
  let source = null;

  // -- formatting ---------------------------------------------------------------

  function seconds(value) {
    if (value === null || value === undefined) return "–";
    if (value < 1) return (value * 1000).toFixed(value < 0.01 ? 2 : 0) + " ms";
    return value.toFixed(2) + " s";
  }
  function millis(value) {
    if (value === null || value === undefined) return "–";
    return value < 10 ? value.toFixed(2) + " ms" : Math.round(value) + " ms";
  }
  function count(value) {
    return String(Math.round(value || 0));
  }
  function cell(row, text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "–" : String(text);
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }
  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  // -- charts -------------------------------------------------------------------

  function chart(svg, points, key, color, now, span) {
    clear(svg);
    const W = 600, H = 160, top = 10, bottom = 150, left = 0;
    let max = 0;
    for (const p of points) max = Math.max(max, p[key]);
    max = max <= 0 ? 1 : niceCeil(max);
    for (const f of [0, 0.5, 1]) {
      const y = bottom - (bottom - top) * f;
      const line = document.createElementNS(SVG, "line");
      line.setAttribute("class", "grid");
      line.setAttribute("x1", left); line.setAttribute("x2", W);
      line.setAttribute("y1", y); line.setAttribute("y2", y);
      svg.appendChild(line);
      const label = document.createElementNS(SVG, "text");
      label.setAttribute("class", "axis");
      label.setAttribute("x", 4); label.setAttribute("y", y - 2);
      label.textContent = formatAxis(max * f);
      svg.appendChild(label);
    }
    if (!points.length) return;
    const coords = points.map((p) => {
      const x = W - ((now - p.t) / span) * W;
      const y = bottom - (bottom - top) * (p[key] / max);
      return x.toFixed(1) + "," + y.toFixed(1);
    });
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("class", "line");
    line.setAttribute("stroke", color);
    line.setAttribute("points", coords.join(" "));
    svg.appendChild(line);
  }
  function niceCeil(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }
  function formatAxis(v) {
    return v >= 10 || v === 0 ? String(Math.round(v)) : v.toFixed(1);
  }

  // -- rendering ----------------------------------------------------------------

  function render(s) {
    $("updated").textContent = new Date(s.time * 1000).toISOString().slice(11, 19) + " UTC";
    $("metrics-note").hidden = !!s.metrics;
    $("open-streams").textContent = count(s.open_streams);
    $("event-rate").textContent = (s.event_rate || 0).toFixed(1);
    $("events-total").textContent = count(s.events_total);
    $("stalls").textContent = count(s.stalls);
    let requests = 0, errors = 0;
    for (const r of Object.values(s.by_route || {})) { requests += r.requests; errors += r.errors; }
    $("requests-total").textContent = count(requests);
    $("errors-total").textContent = count(errors);

    const health = s.health || {};
    const hs = $("health-status");
    let healthText = "health " + (health.status || "?");
    if (Array.isArray(health.workers)) {
      healthText += " · " + health.workers.filter((w) => w.alive).length + "/" + health.workers.length + " workers";
    }
    hs.textContent = healthText;
    hs.className = "badge " + (health.status === "ok" ? "ok" : "bad");

    const series = s.series || [];
    const span = series.length ? Math.max(60, s.time - series[0].t) : 60;
    chart($("chart-open"), series, "open_streams", "#2f6fde", s.time, span);
    chart($("chart-rate"), series, "event_rate", "#1f9d55", s.time, span);
    $("open-span").textContent = $("rate-span").textContent = "(last " + Math.round(span) + " s)";

    $("window").textContent = String(s.window_seconds || 60);
    for (const row of document.querySelectorAll("#percentiles tbody tr")) {
      const p = (s.percentiles || {})[row.dataset.key];
      while (row.children.length > 1) row.removeChild(row.lastChild);
      for (const part of ["window", "total"]) {
        const v = p ? p[part] : {};
        for (const q of ["p50", "p90", "p99"]) cell(row, seconds(v[q]), "num");
        cell(row, count(v.count), "num");
      }
    }

    const ends = $("ends").tBodies[0];
    clear(ends);
    const reasons = Object.entries(s.ends || {});
    const most = Math.max(1, ...reasons.map((e) => e[1]));
    for (const [reason, n] of reasons) {
      const tr = document.createElement("tr");
      cell(tr, reason);
      const td = cell(tr, count(n), "num");
      td.id = "end-" + reason;
      const bar = document.createElement("td");
      const span = document.createElement("span");
      span.className = "bar";
      span.style.width = Math.round((120 * n) / most) + "px";
      bar.appendChild(span);
      tr.appendChild(bar);
      ends.appendChild(tr);
    }

    const routes = $("routes").tBodies[0];
    clear(routes);
    for (const r of s.routes || []) {
      const tr = document.createElement("tr");
      const h = r.upstream_health || {};
      cell(tr, r.name);
      cell(tr, r.path);
      cell(tr, r.upstream);
      const state = h.up === true ? "up" : h.up === false ? "down" : "unknown";
      cell(tr, state, "badge " + state);
      cell(tr, millis(h.connect_ms), "num");
      cell(tr, h.last_error || "", "err").title = h.last_error || "";
      cell(tr, count(r.open_streams), "num");
      cell(tr, count(r.events), "num");
      cell(tr, count(r.requests), "num");
      cell(tr, count(r.errors), "num");
      routes.appendChild(tr);
    }

    const calls = $("calls").tBodies[0];
    clear(calls);
    for (const c of s.calls || []) {
      const tr = document.createElement("tr");
      cell(tr, String(c.created_at || "").replace("T", " ").slice(0, 23));
      cell(tr, c.tenant_id);
      cell(tr, c.method);
      cell(tr, c.path, "path").title = c.path || "";
      cell(tr, c.route);
      cell(tr, c.status_code, "num s" + String(c.status_code)[0]);
      cell(tr, millis(c.latency_ms), "num");
      cell(tr, c.is_stream ? "yes" : "");
      cell(tr, c.is_stream ? millis(c.first_event_ms) : "", "num");
      cell(tr, c.is_stream ? c.event_count : "", "num");
      cell(tr, c.end_reason || "");
      calls.appendChild(tr);
    }
    $("calls-count").textContent = String((s.calls || []).length);
    $("calls-note").textContent = !s.history ? "call history is off ([history] enabled = false)"
      : s.calls_error ? "call history cannot be read: " + s.calls_error : "";
  }

  // -- the stream ---------------------------------------------------------------

  function filterQuery() {
    const q = new URLSearchParams();
    for (const el of form.elements) {
      if (el.name && el.value.trim() !== "") q.set(el.name, el.value.trim());
    }
    return q.toString();
  }

  function connect(query) {
    if (source) source.close();
    source = new EventSource("/dashboard/events" + (query ? "?" + query : ""));
    source.addEventListener("snapshot", (e) => render(JSON.parse(e.data)));
    source.onopen = () => { $("conn-status").textContent = "live"; $("conn-status").className = "badge ok"; };
    source.onerror = () => { $("conn-status").textContent = "reconnecting"; $("conn-status").className = "badge bad"; };
  }

  // A filter is checked by one snapshot request first: the stream cannot
  // show a 400's message, the JSON answer can.
  function apply(query) {
    fetch("/dashboard/snapshot" + (query ? "?" + query : ""), { cache: "no-store" })
      .then((r) => r.json().then((body) => ({ ok: r.ok, body: body })))
      .then(({ ok, body }) => {
        if (!ok) {
          $("filter-error").textContent = (body.error && body.error.message) || "invalid filter";
          return;
        }
        $("filter-error").textContent = "";
        history.replaceState(null, "", query ? "?" + query : location.pathname);
        render(body);
        connect(query);
      })
      .catch((e) => { $("filter-error").textContent = String(e); });
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    apply(filterQuery());
  });

  const initial = new URLSearchParams(location.search);
  for (const el of form.elements) {
    if (el.name && initial.has(el.name)) el.value = initial.get(el.name);
  }
  apply(filterQuery());
})();
