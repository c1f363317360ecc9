// The admin's chart of one series (admin/marketdata/series_chart.html): candles and volume, the stored
// indicators as toggleable lines (moving averages and bands over the candles, RSI and MACD in panes of
// their own), a crosshair readout of OHLCV and indicator values that says why a blank value is blank,
// and new candles appended as the hub pushes them.
(function () {
  "use strict";
  var LC = window.LightweightCharts;
  var data = JSON.parse(document.getElementById("chart-data").textContent);
  var container = document.getElementById("chart");
  var readout = document.getElementById("readout");
  var status = document.getElementById("live-status");
  var COLOURS = ["#9c27b0", "#ff9800", "#2196f3", "#009688", "#795548", "#607d8b", "#e91e63", "#3f51b5", "#8bc34a", "#00bcd4"];

  var chart = LC.createChart(container, {
    autoSize: true,
    timeScale: { timeVisible: true, secondsVisible: false },
    crosshair: { mode: LC.CrosshairMode.Normal },
    localization: { timeFormatter: function (t) { return new Date(t * 1000).toISOString().slice(0, 16).replace("T", " "); } },
  });
  var candles = chart.addSeries(LC.CandlestickSeries, {
    upColor: "#26a69a", downColor: "#ef5350", wickUpColor: "#26a69a", wickDownColor: "#ef5350", borderVisible: false,
  });
  candles.priceScale().applyOptions({ scaleMargins: { top: 0.05, bottom: 0.25 } });
  var volume = chart.addSeries(LC.HistogramSeries, { priceFormat: { type: "volume" }, priceScaleId: "volume", lastValueVisible: false });
  volume.priceScale().applyOptions({ scaleMargins: { top: 0.8, bottom: 0 } });

  function volumeBar(c) {
    return { time: c.time, value: c.volume, color: c.close >= c.open ? "rgba(38,166,154,0.5)" : "rgba(239,83,80,0.5)" };
  }
  candles.setData(data.candles.map(function (c) { return { time: c.time, open: c.open, high: c.high, low: c.low, close: c.close }; }));
  volume.setData(data.candles.map(volumeBar));

  // Indicator lines, created when first switched on; panes after the main one for RSI and MACD.
  var lines = {};
  var values = {}; // name -> {time: value}
  var nextPane = 1;
  Object.keys(data.indicators).forEach(function (name) {
    values[name] = {};
    data.indicators[name].forEach(function (p) { if (p.value !== undefined) values[name][p.time] = p.value; });
  });
  function colour(name) {
    var all = Object.keys(data.indicators);
    return COLOURS[all.indexOf(name) % COLOURS.length];
  }
  function show(name, on) {
    if (on && !lines[name]) {
      var pane = data.overlays.indexOf(name) >= 0 ? 0 : nextPane++;
      lines[name] = chart.addSeries(LC.LineSeries, {
        color: colour(name), lineWidth: 1, title: name, priceLineVisible: false, lastValueVisible: false,
      }, pane);
      lines[name].setData(data.indicators[name]);
    } else if (!on && lines[name]) {
      chart.removeSeries(lines[name]);
      delete lines[name];
    }
  }
  document.querySelectorAll("#toggles input[data-indicator]").forEach(function (box) {
    show(box.dataset.indicator, box.checked);
    box.addEventListener("change", function () { show(box.dataset.indicator, box.checked); });
  });
  chart.timeScale().fitContent();

  // Crosshair readout: OHLCV, then every indicator (blank ones say why).
  var byTime = {};
  data.candles.forEach(function (c) { byTime[c.time] = c; });
  function fmt(v) { return v === undefined || v === null ? "" : Number(v).toPrecision(8).replace(/\.?0+$/, ""); }
  chart.subscribeCrosshairMove(function (param) {
    if (!param.time || !byTime[param.time]) { return; }
    var c = byTime[param.time];
    var text = new Date(param.time * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC  O " + fmt(c.open) +
      "  H " + fmt(c.high) + "  L " + fmt(c.low) + "  C " + fmt(c.close) + "  V " + fmt(c.volume);
    var parts = Object.keys(values).map(function (name) {
      var v = values[name][param.time];
      return name + " " + (v === undefined ? "blank (" + data.warmup[name] + ")" : fmt(v));
    });
    readout.textContent = text + (parts.length ? "\n" + parts.join("  ·  ") : "");
  });

  // Live: each candle the hub pushes for this series is appended (or replaces the newest one).
  function lastTime() { return data.candles.length ? data.candles[data.candles.length - 1].time : 0; }
  function append(message) {
    var k = message.candle;
    var c = { time: Math.floor(k.ts / 1000), open: k.open, high: k.high, low: k.low, close: k.close, volume: k.volume };
    if (c.time < lastTime()) { return; } // a revision of an older candle: shown on the next reload
    if (c.time > lastTime()) { data.candles.push(c); } else { data.candles[data.candles.length - 1] = c; }
    byTime[c.time] = c;
    candles.update({ time: c.time, open: c.open, high: c.high, low: c.low, close: c.close });
    volume.update(volumeBar(c));
    Object.keys(message.indicators || {}).forEach(function (name) {
      var v = message.indicators[name];
      if (!values[name]) { return; }
      var point = v === null ? { time: c.time } : { time: c.time, value: v };
      if (v !== null) { values[name][c.time] = v; }
      data.indicators[name].push(point);
      if (lines[name]) { lines[name].update(point); }
    });
    container.dataset.candles = String(data.candles.length);
    container.dataset.lastTime = String(c.time);
  }
  container.dataset.candles = String(data.candles.length);
  container.dataset.lastTime = String(lastTime());
  window.DCHub.connect(
    [{ channel: "ohlcv", exchange: data.exchange, symbol: data.symbol, timeframe: data.timeframe }],
    function (message) { if (message.type === "ohlcv") { append(message); } },
    function (state) { status.dataset.state = state; status.textContent = "Live: " + state; }
  );
})();
