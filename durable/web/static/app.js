// durable's dashboard: the throughput and failure-rate charts (uPlot), drawn from the
// JSON the page carries in <script type="application/json" id="throughput-data">.
// No inline script anywhere: the Content-Security-Policy allows only files of /static.
(function () {
  "use strict";

  function draw() {
    var source = document.getElementById("throughput-data");
    if (!source || typeof uPlot === "undefined") return;
    var d = JSON.parse(source.textContent);
    var width = function (el) { return Math.max(el.clientWidth || 0, 320); };
    var throughput = document.getElementById("chart-throughput");
    if (throughput && !throughput.dataset.drawn) {
      throughput.dataset.drawn = "1";
      new uPlot({
        width: width(throughput), height: 180,
        series: [
          {},
          { label: "completed", stroke: "#2e7d32", width: 2 },
          { label: "failed", stroke: "#c62828", width: 2 },
          { label: "cancelled", stroke: "#6d6d6d", width: 1 },
        ],
        axes: [{}, { label: "runs / min" }],
      }, [d.minutes, d.completed, d.failed, d.cancelled], throughput);
    }
    var failures = document.getElementById("chart-failures");
    if (failures && !failures.dataset.drawn) {
      failures.dataset.drawn = "1";
      new uPlot({
        width: width(failures), height: 180,
        series: [{}, {
          label: "failure rate", stroke: "#c62828", width: 2,
          value: function (u, v) { return v == null ? "-" : (100 * v).toFixed(1) + " %"; },
        }],
        axes: [{}, { values: function (u, vals) { return vals.map(function (v) { return (100 * v).toFixed(0) + "%"; }); } }],
        scales: { y: { range: [0, 1] } },
      }, [d.minutes, d.failure_rate], failures);
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else {
    draw();
  }
})();
