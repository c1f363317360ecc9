// A client of the live-updates hub (/ws): connects with the page's session cookie, subscribes, hands each
// pushed message to `onMessage`, reconnects with a growing delay, and reports its state to `onState`
// ("connecting", "live", "reconnecting"). Used by the dashboard (admin index) and the chart.
(function () {
  "use strict";
  function connect(subscriptions, onMessage, onState) {
    var delay = 1000;
    var socket = null;
    var pinger = null;
    function open() {
      var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
      socket = new WebSocket(scheme + window.location.host + "/ws");
      onState && onState("connecting");
      socket.onopen = function () {
        delay = 1000;
        subscriptions.forEach(function (s) {
          socket.send(JSON.stringify(Object.assign({ action: "subscribe" }, s)));
        });
        pinger = setInterval(function () {
          socket.send(JSON.stringify({ action: "ping" }));
        }, 25000);
      };
      socket.onmessage = function (event) {
        var message = JSON.parse(event.data);
        if (message.type === "subscribed") {
          onState && onState("live");
        } else if (message.type === "error") {
          console.warn("hub:", message.error);
        } else if (message.type !== "pong" && message.type !== "unsubscribed") {
          onMessage(message);
        }
      };
      socket.onclose = function () {
        clearInterval(pinger);
        onState && onState("reconnecting");
        setTimeout(open, delay);
        delay = Math.min(delay * 2, 30000);
      };
    }
    open();
    return { close: function () { socket.onclose = null; socket.close(); clearInterval(pinger); } };
  }
  window.DCHub = { connect: connect };
})();
