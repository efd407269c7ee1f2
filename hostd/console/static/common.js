/* What the console's two pages share (docs/console.md): the index (console.js)
   and the page of a VM (vm.js). Loaded before either, as window.sfmpiCommon. */
"use strict";

window.sfmpiCommon = (function () {
  const fixed = x => (typeof x === "number" ? x.toFixed(1) : "–");
  const timeLabel = ms => new Date(ms).toLocaleTimeString([], { hour12: false });

  // The time axis ticks on whole minutes (a linear scale would tick wherever the window starts).
  const STEPS_MIN = [1, 2, 5, 10, 15, 30, 60];
  const minuteLabel = ms => new Date(ms).toLocaleTimeString([], { hour12: false, hour: "2-digit", minute: "2-digit" });
  function minuteTicks(axis) {
    const wanted = (axis.max - axis.min) / 60000 / 8;
    const step = 60000 * (STEPS_MIN.find(m => m >= wanted) || 60);
    const ticks = [];
    for (let t = Math.ceil(axis.min / step) * step; t <= axis.max; t += step) ticks.push({ value: t });
    axis.ticks = ticks;
  }

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v; else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  }

  // A line chart's options over the time window [min, max] (ms); redraw() moves it.
  function baseOptions(min, max, yScales, tooltipLabel) {
    return {
      animation: false, responsive: true, maintainAspectRatio: false, parsing: false,
      interaction: { mode: "nearest", intersect: false },
      plugins: {
        legend: { labels: { boxWidth: 12 } },
        tooltip: { callbacks: { title: items => items.length ? timeLabel(items[0].parsed.x) : "",
                                ...(tooltipLabel ? { label: tooltipLabel } : {}) } },
      },
      scales: {
        x: { type: "linear", min, max, afterBuildTicks: minuteTicks,
             ticks: { callback: v => minuteLabel(v), maxRotation: 0, autoSkipPadding: 24 } },
        ...yScales,
      },
    };
  }

  function redraw(chart, min, max) {
    chart.options.scales.x.min = min;
    chart.options.scales.x.max = max;
    chart.update("none");
  }

  // Samples arrive in id order; a late report can be older than the last point.
  function insertByX(data, point) {
    let i = data.length;
    while (i > 0 && data[i - 1].x > point.x) i--;
    data.splice(i, 0, point);
  }

  function trim(data, from) {
    let n = 0;
    while (n < data.length && data[n].x < from) n++;
    if (n) data.splice(0, n);
  }

  // The connection badge of a page's EventSource (#connection).
  function watch(source) {
    const connection = document.getElementById("connection");
    const set = (state, text) => { connection.dataset.state = state; connection.textContent = text; };
    source.addEventListener("open", () => set("live", "live"));
    source.addEventListener("error", () => (source.readyState === EventSource.CLOSED
      ? set("lost", "disconnected") : set("connecting", "reconnecting…")));
  }

  // ?minutes=N of the page, passed on to its streams.
  function windowQuery() {
    const minutes = new URLSearchParams(location.search).get("minutes");
    return minutes ? `minutes=${encodeURIComponent(minutes)}` : "";
  }

  const vmHref = name => `/vm?name=${encodeURIComponent(name)}`;

  return { fixed, timeLabel, minuteLabel, minuteTicks, el, baseOptions, redraw, insertByX, trim, watch,
           windowQuery, vmHref };
})();
