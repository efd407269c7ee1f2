/* The console page (docs/console.md): the VMs of the host, each a link to its
   page (vm.js), and one card per pool, fed by /events.

   /events sends a `state` snapshot first (again after every reconnect, so the
   page simply rebuilds) and then an `update` each second with the samples and
   events that are new since the last one, and each pool's current state, VM
   count and parameters. Chart.js (Debian's libjs-chart.js, 3.9 or 4) draws;
   animation is off, since the charts change every second.

   window.sfmpiConsole is what tests read (tests/integration/test_console_browser.py,
   and the pool tests that reuse it): keep its names and meaning stable. */
"use strict";

(function () {
  // The controller's event kinds (hostd/pool/): growth green, shrink amber, loss red.
  const KIND_COLOURS = {
    up: "#1f8a4c", "scale-out": "#12b76a", serving: "#039855",
    drain: "#f79009", "scale-in": "#dc6803", dead: "#d92d20", error: "#b42318",
    replace: "#7a5af8", param: "#2e90fa", checkpoint: "#0e9384", release: "#667085", down: "#475467",
  };
  const OTHER_KIND = "#98a2b3";
  const MAX_LISTED = 200;

  const pools = new Map();  // name -> the card's elements, charts and data
  let windowMs = 15 * 60 * 1000;
  let meanings = {};
  let serverNow = Date.now();
  let updates = 0;
  let ready = false;

  const C = window.sfmpiCommon;
  const { el, fixed, timeLabel, insertByX, trim } = C;
  const colour = kind => KIND_COLOURS[kind] || OTHER_KIND;

  // -- charts ---------------------------------------------------------------
  const baseOptions = (yScales, tooltipLabel) => C.baseOptions(serverNow - windowMs, serverNow, yScales, tooltipLabel);

  // Each event point carries its kind as a label: above it, else below it where that
  // would overlap a label already drawn; left out where both would (its tooltip still says).
  const eventLabels = {
    id: "sfmpiEventLabels",
    afterDatasetsDraw(chart) {
      const meta = chart.getDatasetMeta(1);
      const data = chart.data.datasets[1].data;
      const ctx = chart.ctx;
      const drawn = [];
      const clear = r => drawn.every(d => r.x1 < d.x0 || r.x0 > d.x1 || r.y1 < d.y0 || r.y0 > d.y1);
      ctx.save();
      ctx.font = "11px system-ui, sans-serif";
      ctx.textAlign = "center";
      meta.data.forEach((pt, i) => {
        const text = data[i].kind;
        const half = ctx.measureText(text).width / 2 + 2;
        const spot = [pt.y - 9, pt.y + 17].map(y => ({ y, x0: pt.x - half, x1: pt.x + half, y0: y - 11, y1: y + 2 }))
          .find(clear);
        if (!spot) return;
        ctx.fillStyle = colour(text);
        ctx.fillText(text, pt.x, spot.y);
        drawn.push(spot);
      });
      ctx.restore();
    },
  };

  function vmCountChart(canvas) {
    const label = item => {
      if (item.datasetIndex === 0) return `VMs: ${item.parsed.y}`;
      const e = item.raw;
      return `${e.kind}${e.vm ? " " + e.vm : ""}${e.detail ? ": " + e.detail : ""} (VMs: ${e.y})`;
    };
    const options = baseOptions({ y: { beginAtZero: true, suggestedMax: 4, ticks: { precision: 0 },
                                       title: { display: true, text: "VMs" } } }, label);
    // No legend: each event point is labelled with its kind, and the axis says "VMs".
    options.plugins.legend.display = false;
    options.layout = { padding: { top: 14, right: 12 } };  // room for the labels of the newest points
    return new Chart(canvas, {
      type: "line",
      data: { datasets: [
        { label: "VMs", data: [], stepped: true, borderColor: "#1d2330", backgroundColor: "#1d2330",
          borderWidth: 2, pointRadius: 0 },
        { label: "events", data: [], showLine: false, pointRadius: 5, pointHoverRadius: 7,
          pointStyle: "rectRot", pointBackgroundColor: [], pointBorderColor: [] },
      ] },
      options,
      plugins: [eventLabels],
    });
  }

  function loadChart(canvas) {
    return new Chart(canvas, {
      type: "line",
      data: { datasets: [
        { label: "CPU %", data: [], yAxisID: "cpu", borderColor: "#2e90fa", backgroundColor: "#2e90fa",
          borderWidth: 1.5, pointRadius: 1 },
        { label: "memory MiB", data: [], yAxisID: "mem", borderColor: "#7a5af8", backgroundColor: "#7a5af8",
          borderWidth: 1.5, pointRadius: 1 },
      ] },
      options: baseOptions({
        cpu: { position: "left", min: 0, max: 100, title: { display: true, text: "CPU %" } },
        mem: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false },
               title: { display: true, text: "MiB" } },
      }),
    });
  }

  // -- a pool's card ------------------------------------------------------------
  function makeCard(name) {
    const p = { name, events: [], vms: new Map(), vmCount: 0, paramsJson: "" };
    p.state = el("span", { id: `state-${name}`, class: "state" });
    p.vmcount = el("span", { id: `vmcount-${name}`, class: "vmcount" }, "VMs: –");
    p.frontend = el("a", { id: `frontend-${name}`, class: "frontend" });
    p.error = el("p", { id: `error-${name}`, class: "error" });
    p.error.hidden = true;
    p.params = el("tbody");
    p.eventList = el("ul", { id: `events-${name}`, class: "events" });
    p.vmsBox = el("div", { id: `vms-${name}`, class: "vms" });
    const canvas = el("canvas", { id: `vmchart-${name}` });
    p.section = el("section", { id: `pool-${name}`, class: "pool", "data-pool": name },
      el("div", { class: "pool-head" }, el("h2", {}, name), p.state, p.vmcount,
        el("span", { class: "muted" }, "frontend ", p.frontend)),
      p.error,
      el("div", { class: "pool-body" },
        el("div", {}, el("h3", {}, "Parameters"), el("table", { id: `params-${name}`, class: "params" }, p.params)),
        el("div", {}, el("h3", {}, "VMs over time"), el("div", { class: "chart-box" }, canvas),
          el("h3", {}, "Events"), p.eventList)),
      el("h3", {}, "Load per VM"), p.vmsBox);
    document.getElementById("pools").append(p.section);
    p.vmChart = vmCountChart(canvas);
    pools.set(name, p);
    return p;
  }

  function vmBlock(p, name) {
    let v = p.vms.get(name);
    if (v) return v;
    const canvas = el("canvas");
    v = { info: el("span", { class: "muted" }) };
    v.box = el("div", { class: "vm", "data-vm": name },
      el("div", { class: "vm-head" }, el("strong", {}, el("a", { href: C.vmHref(name) }, name)), v.info), el("div", { class: "chart-box" }, canvas));
    p.vmsBox.append(v.box);
    v.chart = loadChart(canvas);
    p.vms.set(name, v);
    return v;
  }

  function showParams(p, params) {
    const json = JSON.stringify(params);
    if (json === p.paramsJson) return;
    p.paramsJson = json;
    p.params.replaceChildren(...Object.entries(params).map(([k, v]) =>
      el("tr", { "data-param": k }, el("td", { title: meanings[k] || "" }, k), el("td", {}, String(v)))));
  }

  function showEvents(p) {
    const items = p.events.slice(-MAX_LISTED).reverse().map(e => {
      const kind = el("span", { class: "kind" }, e.kind);
      kind.style.color = colour(e.kind);
      return el("li", { "data-kind": e.kind, "data-id": String(e.id) }, kind, " ",
        el("time", {}, timeLabel(e.at)), e.vm ? ` ${e.vm}` : "", e.detail ? ` — ${e.detail}` : "",
        el("span", { class: "muted" }, ` · VMs ${e.vm_count}`));
    });
    p.eventList.replaceChildren(...items);
  }

  function applyPool(view) {
    const p = pools.get(view.name) || makeCard(view.name);
    p.state.textContent = view.state;
    p.state.dataset.state = view.state;
    p.vmCount = view.vm_count;
    p.vmcount.textContent = `VMs: ${view.vm_count}`;
    p.frontend.textContent = view.frontend || "–";
    if (view.frontend) p.frontend.href = view.frontend; else p.frontend.removeAttribute("href");
    p.error.textContent = view.error || "";
    p.error.hidden = !view.error;
    showParams(p, view.params || {});

    const from = serverNow - windowMs;
    const known = new Set(p.events.map(e => e.id));
    const fresh = view.events.filter(e => !known.has(e.id));
    p.events = p.events.concat(fresh).filter(e => e.at >= from).sort((a, b) => a.id - b.id);
    if (fresh.length || p.eventList.children.length !== Math.min(p.events.length, MAX_LISTED)) showEvents(p);

    for (const s of view.samples) {
      const v = vmBlock(p, s.vm);
      insertByX(v.chart.data.datasets[0].data, { x: s.at, y: s.cpu });
      insertByX(v.chart.data.datasets[1].data, { x: s.at, y: s.ram_mib });
    }
    const present = new Map(view.vms.map(vm => [vm.name, vm]));
    for (const vm of view.vms) vmBlock(p, vm.name);
    for (const [name, v] of p.vms) {
      v.chart.data.datasets.forEach(d => trim(d.data, from));
      const vm = present.get(name);
      if (!vm && !v.chart.data.datasets[0].data.length) {  // gone, and its history with it
        v.chart.destroy();
        v.box.remove();
        p.vms.delete(name);
        continue;
      }
      v.box.dataset.present = String(Boolean(vm));
      v.info.textContent = vm ? `${vm.state} · ${fixed(vm.cpu)} % · ${fixed(vm.ram_mib)} MiB` : "gone";
      redraw(v.chart);
    }

    // The line steps at each event to the count recorded with it and ends at the current count.
    const byTime = p.events.slice().sort((a, b) => a.at - b.at || a.id - b.id);
    const line = byTime.map(e => ({ x: e.at, y: e.vm_count }));
    if (!line.length) line.push({ x: from, y: view.vm_count });
    line.push({ x: serverNow, y: view.vm_count });
    const ds = p.vmChart.data.datasets;
    ds[0].data = line;
    ds[1].data = byTime.map(e => ({ x: e.at, y: e.vm_count, kind: e.kind, vm: e.vm, detail: e.detail }));
    ds[1].pointBackgroundColor = ds[1].pointBorderColor = byTime.map(e => colour(e.kind));
    redraw(p.vmChart);
  }

  const redraw = chart => C.redraw(chart, serverNow - windowMs, serverNow);

  // -- the host's VMs: a table of links to their pages ------------------------
  let vmNames = [];
  function showVms(msg) {
    const vms = msg.vms || [];
    vmNames = vms.map(v => v.name);
    const rows = vms.map(v => el("tr", { "data-vm": v.name, "data-state": v.state },
      el("td", {}, el("a", { href: C.vmHref(v.name) }, v.name)),
      el("td", {}, v.role || "–"), el("td", { class: "vm-state" }, v.state), el("td", {}, v.family || "–"),
      el("td", { class: "num" }, v.cpus == null ? "–" : String(v.cpus)),
      el("td", { class: "num" }, v.mem_mb == null ? "–" : String(v.mem_mb)),
      el("td", { class: "num" }, fixed(v.cpu_percent)), el("td", { class: "num" }, fixed(v.pss_mib))));
    document.getElementById("vm-rows").replaceChildren(...rows);
    document.getElementById("vm-list").hidden = vms.length === 0;
    document.getElementById("no-vms").hidden = vms.length > 0 || Boolean(msg.vms_error);
    const error = document.getElementById("vms-error");
    error.textContent = msg.vms_error || "";
    error.hidden = !msg.vms_error;
  }

  function dropCard(name) {
    const p = pools.get(name);
    p.vmChart.destroy();
    p.vms.forEach(v => v.chart.destroy());
    p.section.remove();
    pools.delete(name);
  }

  function header(msg) {
    serverNow = msg.now;
    windowMs = msg.window_ms;
    document.getElementById("window").textContent = String(Math.round(windowMs / 60000));
    document.getElementById("updated").textContent = `as of ${timeLabel(msg.now)}`;
  }

  function onState(msg) {
    header(msg);
    meanings = msg.param_meanings || {};
    [...pools.keys()].forEach(dropCard);
    msg.pools.forEach(applyPool);
    document.getElementById("no-pools").hidden = pools.size > 0;
    showVms(msg);
    ready = true;
    updates++;
  }

  function onUpdate(msg) {
    header(msg);
    const names = new Set(msg.names);
    [...pools.keys()].filter(n => !names.has(n)).forEach(dropCard);
    msg.pools.forEach(applyPool);
    document.getElementById("no-pools").hidden = pools.size > 0;
    showVms(msg);
    updates++;
  }

  // -- the test hooks ---------------------------------------------------------------
  window.sfmpiConsole = {
    ready: () => ready,                      // the first snapshot is drawn
    updates: () => updates,                  // messages drawn so far (snapshot included)
    pools: () => [...pools.keys()],
    vms: () => vmNames.slice(),              // the host's VMs listed, in the table's order
    // Data points in all of a pool's charts (its VM-count chart and every VM's load chart).
    points(pool) {
      const p = pools.get(pool);
      if (!p) return null;
      const charts = [p.vmChart, ...[...p.vms.values()].map(v => v.chart)];
      return charts.reduce((n, c) => n + c.data.datasets.reduce((m, d) => m + d.data.length, 0), 0);
    },
    vmCount: pool => (pools.has(pool) ? pools.get(pool).vmCount : null),
    events: pool => (pools.has(pool) ? pools.get(pool).events.map(e => e.kind) : null),  // oldest first
  };

  const query = C.windowQuery();
  const source = new EventSource("/events" + (query ? `?${query}` : ""));
  C.watch(source);
  source.addEventListener("state", e => onState(JSON.parse(e.data)));
  source.addEventListener("update", e => onUpdate(JSON.parse(e.data)));
})();
