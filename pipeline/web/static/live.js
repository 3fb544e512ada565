// A running run's page follows it without a reload: every few seconds it asks the
// server for the run's state (/api/runs/RUN/state: its status and a digest of what the
// page shows) and, when that changed, swaps in the freshly rendered part of the page
// (/runs/RUN/live). With a broker the server also relays the run's live events (the
// ones `selfprog-cli watch` prints, /api/runs/RUN/events); each one makes the page ask
// at once. The server renders and escapes everything; this file only moves markup the
// server made, and never reads an event's content. It stops once the run has ended.
// Loaded as a file: the Content-Security-Policy allows no inline script.
"use strict";

(function () {
  function follow(box) {
    var period = parseInt(box.dataset.pollMs, 10) || 1500;
    var version = box.dataset.version;
    var timer = null, busy = false, again = false, source = null;

    function schedule(ms) {
      clearTimeout(timer);
      timer = setTimeout(tick, ms);
    }

    function done(live, ms) {
      busy = false;
      if (!live) {
        if (source) { source.close(); }
        return;
      }
      schedule(again ? 0 : ms);
      again = false;
    }

    function tick() {
      if (busy) { again = true; return; }
      busy = true;
      fetch(box.dataset.stateUrl, {credentials: "same-origin", cache: "no-store"})
        .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.json(); })
        .then(function (state) {
          if (state.version === version) {
            return state.live;
          }
          return fetch(box.dataset.liveUrl, {credentials: "same-origin", cache: "no-store"})
            .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.text(); })
            .then(function (html) {
              box.innerHTML = html;
              version = state.version;
              box.dataset.version = version;
              box.dataset.live = state.live ? "1" : "0";
              return state.live;
            });
        })
        .then(function (live) { done(live, period); },
              function () { done(true, period * 4); });   // server away: back off
    }

    if (box.dataset.eventsUrl && window.EventSource) {
      source = new EventSource(box.dataset.eventsUrl);
      source.onmessage = function () { schedule(0); };
    }
    schedule(period);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("live");
    if (box && box.dataset.live === "1") {
      follow(box);
    }
  });
}());
