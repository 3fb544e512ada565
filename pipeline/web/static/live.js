// A running run's page follows it without a reload: every few seconds it asks the
// server for the run's state (/api/runs/RUN/state: its status and a digest of what the
// page shows) and, when that changed, swaps in the freshly rendered part of the page
// (/runs/RUN/live). The server renders and escapes everything; this file only moves
// markup the server made. It stops once the run has ended. Loaded as a file: the
// Content-Security-Policy allows no inline script.
"use strict";

(function () {
  function follow(box) {
    var period = parseInt(box.dataset.pollMs, 10) || 1500;
    var version = box.dataset.version;

    function tick() {
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
        .then(function (live) { if (live) { setTimeout(tick, period); } },
              function () { setTimeout(tick, period * 4); });   // server away: back off
    }
    setTimeout(tick, period);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("live");
    if (box && box.dataset.live === "1") {
      follow(box);
    }
  });
}());
