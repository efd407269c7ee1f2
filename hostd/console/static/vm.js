/* The page of one VM (docs/console.md, "The page of a VM"), fed by /events/vm.

   /events/vm?name=NAME sends a `state` snapshot first (again after every
   reconnect, so the page rebuilds its charts) and then an `update` each second
   with the points newer than those sent, the VM's record and settings, and
   every controller it is a member of. The series are made on the server
   (hostd/console/state.py): the disk and network counters arrive as bytes/s.
   A name the server refuses (400) or does not know (404) ends the stream
   before it starts: the page then asks /api/vm for the reason and shows it.

   window.sfmpiVm is what tests read (tests/integration/test_console_browser.py):
   keep its names and meaning stable. */
"use strict";

(function () {
  const C = window.sfmpiCommon;
  const { el, fixed, timeLabel, insertByX, trim } = C;
  const PALETTE = ["#2e90fa", "#f79009", "#12b76a", "#7a5af8", "#ee46bc", "#0e9384", "#667085", "#dc6803"];
  const name = new URLSearchParams(location.search).get("name") || "";

  let serverNow = Date.now();
  let windowMs = 15 * 60 * 1000;
  let ready = false;
  let updates = 0;
  let errorText = "";
  let vmState = "";
  let summaryJson = "";
  let settingsJson = "";
  const charts = {};              // cpu, mem, disk, net -> Chart
  const controllers = new Map();  // name -> { section, chart, ... }

  const from = () => serverNow - windowMs;
  const baseOptions = (yScales, tooltipLabel) => C.baseOptions(from(), serverNow, yScales, tooltipLabel);

  // Bytes per second in binary units, for the disk and network axes and tooltips.
  function rate(v) {
    const units = ["B/s", "KiB/s", "MiB/s", "GiB/s"];
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return `${Number.isInteger(v) ? v : v.toFixed(1)} ${units[i]}`;
  }

  function line(label, i, extra) {
    const c = PALETTE[i % PALETTE.length];
    return { label, data: [], borderColor: c, backgroundColor: c, borderWidth: 1.5, pointRadius: 1, ...extra };
  }

  function chart(canvas, datasets, yScales, tooltipLabel) {
    return new Chart(canvas, { type: "line", data: { datasets }, options: baseOptions(yScales, tooltipLabel) });
  }

  function makeCharts() {
    const rateAxis = { beginAtZero: true, ticks: { callback: v => rate(v) } };
    const rateLabel = item => `${item.dataset.label}: ${rate(item.parsed.y)}`;
    charts.cpu = chart(document.getElementById("chart-cpu"), [line("QEMU (all threads)", 0, { borderWidth: 2 })],
      { y: { beginAtZero: true, suggestedMax: 100, title: { display: true, text: "% of a core" } } });
    charts.mem = chart(document.getElementById("chart-mem"), [line("PSS MiB", 3)],
      { y: { beginAtZero: true, title: { display: true, text: "MiB" } } });
    charts.disk = chart(document.getElementById("chart-disk"), [line("read", 0), line("write", 1)],
      { y: rateAxis }, rateLabel);
    charts.net = chart(document.getElementById("chart-net"), [line("received", 2), line("sent", 4)],
      { y: rateAxis }, rateLabel);
  }

  // The CPU chart has one line per vCPU thread after the whole process's.
  function vcpuDatasets(count) {
    const ds = charts.cpu.data.datasets;
    while (ds.length < count + 1) {
      const i = ds.length - 1;
      ds.push(line(`vCPU ${i}`, i + 1, { borderDash: [4, 3], pointRadius: 0 }));
    }
  }

  function clearCharts() {
    for (const c of Object.values(charts)) c.data.datasets.forEach(d => { d.data = []; });
    charts.cpu.data.datasets.splice(1);
  }

  function add(data, points) {
    for (const p of points) insertByX(data, p);
  }

  function applySeries(s) {
    add(charts.cpu.data.datasets[0].data, s.cpu);
    vcpuDatasets(s.vcpu.length);
    s.vcpu.forEach((points, i) => add(charts.cpu.data.datasets[i + 1].data, points));
    add(charts.mem.data.datasets[0].data, s.pss_mib);
    add(charts.disk.data.datasets[0].data, s.disk_read);
    add(charts.disk.data.datasets[1].data, s.disk_write);
    add(charts.net.data.datasets[0].data, s.net_rx);
    add(charts.net.data.datasets[1].data, s.net_tx);
  }

  function latest(chartName, i) {
    const data = charts[chartName].data.datasets[i].data;
    return data.length ? data[data.length - 1].y : null;
  }

  // -- the VM's record and settings -------------------------------------------
  function rows(tbody, entries, attr) {
    tbody.replaceChildren(...entries.map(([k, v, title]) =>
      el("tr", { [attr]: k }, el("td", { title: title || "" }, k), el("td", {}, v))));
  }

  function showSummary(vm) {
    vmState = vm.state;
    const state = document.getElementById("vm-state");
    state.textContent = vm.state;
    state.dataset.state = vm.state;
    const entries = [
      ["role", vm.role || "–"], ["state", vm.state], ["family", vm.family || "–"],
      ["vCPUs", vm.cpus == null ? "–" : String(vm.cpus)], ["memory", vm.mem_mb == null ? "–" : `${vm.mem_mb} MiB`],
      ["CPU now", `${fixed(latest("cpu", 0))} %`, "the latest sample, percent of one host core"],
      ["PSS now", `${fixed(latest("mem", 0))} MiB`, "the latest sample: the QEMU process's proportional set size"],
    ];
    if (vm.image) entries.push(["image", vm.image]);
    if (vm.checkpoint) entries.push(["checkpoint", vm.checkpoint]);
    if (vm.created) entries.push(["created", new Date(vm.created * 1000).toLocaleString([], { hour12: false })]);
    if (vm.error) entries.push(["error", vm.error]);
    const json = JSON.stringify(entries);
    if (json === summaryJson) return;
    summaryJson = json;
    rows(document.querySelector("#vm-summary tbody"), entries, "data-field");
  }

  function showSettings(settings) {
    const json = JSON.stringify(settings);
    if (json === settingsJson) return;
    settingsJson = json;
    rows(document.querySelector("#settings tbody"), settings.map(s => [s.key, s.text, s.meaning]), "data-setting");
    document.getElementById("no-settings").hidden = settings.length > 0;
  }

  // -- feedback controllers -----------------------------------------------------
  // The member that is measured (the controller keeps its measure near the target).
  const measured = def => Object.entries(def.members || {}).find(([, m]) => m && m.measure) || [null, {}];
  const unit = measure => (/percent$/.test(measure || "") ? " %" : /_ms$/.test(measure || "") ? " ms" : "");

  function makeController(c) {
    const cname = c.name;
    const k = {
      name: cname, defJson: "",
      target: el("strong", { id: `target-${cname}` }), measurement: el("strong", { id: `measurement-${cname}` }),
      actuation: el("strong", { id: `actuation-${cname}` }), role: el("span", { class: "state" }),
      definition: el("tbody"), members: el("tbody"), note: el("p", { id: `note-${cname}`, class: "muted" }),
    };
    const canvas = el("canvas", { id: `chart-control-${cname}` });
    k.section = el("section", { id: `control-${cname}`, class: "pool controller", "data-control": cname },
      el("div", { class: "pool-head" }, el("h2", {}, cname), k.role,
        el("span", {}, "target ", k.target), el("span", {}, "measurement ", k.measurement),
        el("span", {}, "actuation ", k.actuation)),
      el("div", { class: "pool-body" },
        el("div", {}, el("h3", {}, "Definition"),
          el("table", { id: `definition-${cname}`, class: "params" }, k.definition),
          el("h3", {}, "Members"), el("table", { id: `members-${cname}`, class: "list" }, k.members)),
        el("div", {}, el("h3", {}, "Measurement, target and actuation"),
          el("div", { class: "chart-box" }, canvas), k.note)));
    document.getElementById("controllers").append(k.section);
    const [, m] = measured(c.definition);
    k.chart = chart(canvas, [
      line("measurement", 0, { yAxisID: "y" }),
      line("target", 7, { yAxisID: "y", stepped: true, borderDash: [6, 4], pointRadius: 0, borderWidth: 2 }),
      line("actuation (CPU limit of best-effort)", 2, { yAxisID: "limit", stepped: true }),
    ], {
      y: { beginAtZero: true, title: { display: true, text: m.measure || "measurement" } },
      limit: { position: "right", beginAtZero: true, suggestedMax: c.definition.max_limit || 100,
               grid: { drawOnChartArea: false }, title: { display: true, text: "limit, % of a core" } },
    });
    controllers.set(cname, k);
    return k;
  }

  function showDefinition(k, c) {
    const json = JSON.stringify(c.definition) + c.class;
    if (json === k.defJson) return;
    k.defJson = json;
    k.role.textContent = `this VM: ${c.class || "member"}`;
    k.role.dataset.state = c.class;
    const scalars = Object.entries(c.definition).filter(([key, v]) => key !== "name" && key !== "members" &&
                                                         (typeof v !== "object" || v === null));
    rows(k.definition, scalars.map(([key, v]) => [key, String(v)]), "data-param");
    k.members.replaceChildren(el("tr", {}, ...["VM", "class", "measure", "target"].map(h => el("th", {}, h))),
      ...Object.entries(c.definition.members || {}).map(([vm, m]) => el("tr", { "data-vm": vm },
        el("td", {}, vm === name ? el("strong", {}, vm) : el("a", { href: C.vmHref(vm) }, vm)),
        el("td", {}, (m && m.class) || "–"), el("td", {}, (m && m.measure) || "–"),
        el("td", { class: "num" },
          m && typeof m.target === "number" ? `${fixed(m.target)}${unit(m.measure)}` : "–"))));
  }

  function applyController(c) {
    const k = controllers.get(c.name) || makeController(c);
    showDefinition(k, c);
    const ds = k.chart.data.datasets;
    add(ds[0].data, c.measurement);
    add(ds[1].data, c.target);
    add(ds[2].data, c.actuation);
    const [, m] = measured(c.definition);
    const u = unit(m.measure);
    if (c.last_step) {
      k.last = c.last_step;
      k.note.textContent = `last step ${timeLabel(c.last_step.at * 1000)}: error ${fixed(c.last_step.error)}, ` +
        `integral ${fixed(c.last_step.integral)}${c.last_step.note ? " — " + c.last_step.note : ""}`;
    }
    const target = k.last ? k.last.target : m.target;
    k.target.textContent = typeof target === "number" ? `${fixed(target)}${u}` : "–";
    const measurement = k.last ? k.last.measurement : null;
    k.measurement.textContent = typeof measurement === "number" ? `${fixed(measurement)}${u}` : "–";
    k.actuation.textContent = k.last ? `${fixed(k.last.actuation)} %` : "–";
  }

  function dropController(cname) {
    const k = controllers.get(cname);
    k.chart.destroy();
    k.section.remove();
    controllers.delete(cname);
  }

  // -- messages -------------------------------------------------------------------
  function header(msg) {
    serverNow = msg.now;
    windowMs = msg.window_ms;
    document.getElementById("window").textContent = String(Math.round(windowMs / 60000));
    document.getElementById("updated").textContent = `as of ${timeLabel(msg.now)}`;
  }

  function showError(text) {
    errorText = text || "";
    const e = document.getElementById("vm-error");
    e.textContent = errorText;
    e.hidden = !errorText;
  }

  function apply(msg) {
    if (msg.known === false) {  // hostd let go of it, and its statistics aged out
      showError(msg.error);
      vmState = "gone";
      document.getElementById("vm-state").textContent = "gone";
      document.getElementById("vm-state").dataset.state = "gone";
    } else {
      showError("");
      applySeries(msg.series);
      const present = new Set(msg.controllers.map(c => c.name));
      [...controllers.keys()].filter(n => !present.has(n)).forEach(dropController);
      msg.controllers.forEach(applyController);
      showSummary(msg.vm);
      showSettings(msg.settings);
    }
    document.getElementById("no-controllers").hidden = controllers.size > 0;
    const all = [...Object.values(charts), ...[...controllers.values()].map(k => k.chart)];
    for (const c of all) {
      c.data.datasets.forEach(d => trim(d.data, from()));
      C.redraw(c, from(), serverNow);
    }
  }

  function onState(msg) {
    header(msg);
    clearCharts();
    [...controllers.keys()].forEach(dropController);
    apply(msg);
    ready = true;
    updates++;
  }

  function onUpdate(msg) {
    header(msg);
    apply(msg);
    updates++;
  }

  // -- the test hooks ---------------------------------------------------------------
  const countPoints = c => Object.fromEntries(c.data.datasets.map(d => [d.label, d.data.length]));
  window.sfmpiVm = {
    ready: () => ready,                       // the first snapshot is drawn
    updates: () => updates,                   // messages drawn so far (snapshot included)
    name: () => name,
    state: () => vmState,                     // as hostd's record says; "gone" once it is not
    error: () => errorText,                   // why there is nothing to show ("" when there is)
    charts: () => Object.keys(charts),
    // {dataset label: points} of a chart: cpu, mem, disk, net, or a controller's name.
    points(chartName) {
      const c = charts[chartName] || (controllers.get(chartName) || {}).chart;
      return c ? countPoints(c) : null;
    },
    controllers: () => [...controllers.keys()],
  };

  document.getElementById("vm-name").textContent = name;
  document.title = `${name} · sfmpi console`;
  makeCharts();
  const query = [`name=${encodeURIComponent(name)}`, C.windowQuery()].filter(Boolean).join("&");
  const source = new EventSource(`/events/vm?${query}`);
  C.watch(source);
  source.addEventListener("state", e => onState(JSON.parse(e.data)));
  source.addEventListener("update", e => onUpdate(JSON.parse(e.data)));
  source.addEventListener("error", () => {
    if (source.readyState !== EventSource.CLOSED || ready) return;
    fetch(`/api/vm?${query}`).then(r => r.json()).then(body => showError(body.error || "no data"))
      .catch(err => showError(`cannot reach the console: ${err}`));
  });
})();
