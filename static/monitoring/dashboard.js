// The operator's dashboard (templates/admin/index.html) kept current over the hub: job counts by status,
// runs in flight, failing jobs, new candles, exchange budgets and open gaps, without reloading.
(function () {
  "use strict";
  var state = JSON.parse(document.getElementById("fleet-state").textContent);
  var feed = document.getElementById("live-feed");
  var hubStatus = document.getElementById("hub-status");

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }
  function series(job) { return job.exchange + " " + job.symbol + " " + job.timeframe; }
  function utc(ms) { return new Date(ms).toISOString().slice(0, 16).replace("T", " "); }
  function note(kind, text) {
    var first = feed.querySelector("li.quiet");
    if (first) { first.remove(); }
    var item = el("li", { "data-kind": kind }, new Date().toISOString().slice(11, 19) + "  " + text);
    feed.insertBefore(item, feed.firstChild);
    while (feed.children.length > 50) { feed.removeChild(feed.lastChild); }
  }
  function count(id, delta) {
    var node = document.getElementById(id);
    if (!node) { return; }
    var value = Number(node.dataset.count) + delta;
    node.dataset.count = String(value);
    node.textContent = String(value);
  }
  function setStatus(job) {
    var before = state.jobs[String(job.id)];
    if (before !== job.status) {
      if (before) { count("jobs-" + before, -1); }
      count("jobs-" + job.status, 1);
      state.jobs[String(job.id)] = job.status;
      if (before) { note("status", series(job) + ": status " + before + " → " + job.status); }
    }
  }

  function onJob(message) {
    var job = message.job, run = message.run;
    var flight = document.getElementById("in-flight");
    if (message.event === "status") {  // paused, resumed or made due by an operator: no run
      setStatus(job);
      showFailing(job);
      return;
    }
    if (message.event === "started") {
      var row = el("tr", { "data-run": String(run.id) });
      row.appendChild(el("td", {}, series(job)));
      row.appendChild(el("td", { "class": "quiet" }, run.worker));
      row.appendChild(el("td", { "class": "quiet" }, "since " + run.started_at.slice(11, 19)));
      flight.appendChild(row);
      count("in-flight-count", 0);
      document.getElementById("in-flight-count").textContent = String(flight.children.length);
      return;
    }
    var running = flight.querySelector('tr[data-run="' + run.id + '"]');
    if (running) { running.remove(); }
    document.getElementById("in-flight-count").textContent = String(flight.children.length);
    setStatus(job);
    var text = series(job) + ": run " + run.status + ", " + run.candles_written + " candle(s)";
    if (run.error) { text += ": " + run.error.slice(0, 120); }
    note(run.status === "success" ? "run" : "failure", text);
    if (run.candles_written && job.cursor !== null) {
      note("candle", series(job) + ": new candle " + utc(job.cursor) + " UTC");
      document.querySelectorAll('#freshest tr[data-job="' + job.id + '"] .last-candle, #stalest tr[data-job="' + job.id + '"] .last-candle')
        .forEach(function (cell) { cell.textContent = utc(job.cursor); });
    }
    showFailing(job);
  }

  function showFailing(job) {
    var failing = document.querySelector('#failing tr[data-job="' + job.id + '"]');
    if (job.consecutive_failures || job.status === "error") {
      if (!failing) {
        failing = el("tr", { "data-job": String(job.id) });
        document.getElementById("failing").insertBefore(failing, document.getElementById("failing").firstChild);
      }
      failing.innerHTML = "";
      failing.appendChild(el("td", {}, series(job)));
      failing.appendChild(el("td", {}, job.status));
      failing.appendChild(el("td", { "class": "num" }, String(job.consecutive_failures)));
      failing.appendChild(el("td", { "class": "error" }, job.last_error.slice(0, 140)));
    } else if (failing) {
      failing.remove();
    }
  }

  function onRatelimit(m) {
    var row = document.querySelector('#ratelimits tr[data-exchange="' + m.exchange + '"]');
    if (!row) { return; }
    var bar = row.querySelector(".fill");
    bar.classList.toggle("low", m.fill < 0.1);
    bar.firstElementChild.style.width = Math.round(m.fill * 100) + "%";
    row.querySelector(".tokens").textContent = Math.round(m.tokens) + " / " + Math.round(m.capacity);
    row.querySelector(".blocked").textContent = m.blocked_until ? "until " + m.blocked_until.slice(11, 19) : "none";
    var circuit = row.querySelector(".circuit");
    circuit.textContent = m.circuit;
    circuit.classList.toggle("error", m.circuit !== "closed");
    if (m.rate_limited) {
      var cell = row.querySelector(".rejected");
      cell.dataset.count = String(Number(cell.dataset.count) + m.rate_limited);
      cell.textContent = cell.dataset.count;
      note("ratelimit", m.exchange + ": " + m.rate_limited + " rate-limit answer(s) (429/418)");
    }
  }

  function onGaps(m) {
    var key = m.exchange + "|" + m.symbol + "|" + m.timeframe;
    state.gaps[key] = m.open;
    var total = Object.keys(state.gaps).reduce(function (sum, k) { return sum + state.gaps[k]; }, 0);
    document.getElementById("gaps-total").textContent = String(total);
    note("gaps", m.exchange + " " + m.symbol + " " + m.timeframe + ": " + m.open + " open gap(s)");
  }

  function onBackfill(m) {
    note("backfill", series(m.job) + ": backfill " + (m.done ? "done, " : "") + m.candles_written + " candles written");
  }

  window.DCHub.connect(
    [{ channel: "jobs" }, { channel: "ratelimits" }, { channel: "gaps" }],
    function (m) {
      if (m.type === "job") { onJob(m); }
      else if (m.type === "ratelimit") { onRatelimit(m); }
      else if (m.type === "gaps") { onGaps(m); }
      else if (m.type === "backfill") { onBackfill(m); }
    },
    function (s) { hubStatus.dataset.state = s; hubStatus.textContent = "live: " + s; }
  );
})();
