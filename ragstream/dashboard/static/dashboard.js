// Renders every chart of the page from its JSON spec (a <script type="application/json">).
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var charts = document.querySelectorAll("[data-chart]");
  var pending = charts.length;
  function done() {
    pending -= 1;
    if (pending <= 0) { document.body.dataset.chartsRendered = "1"; }
  }
  if (pending === 0) { document.body.dataset.chartsRendered = "1"; return; }
  charts.forEach(function (el) {
    var spec = JSON.parse(document.getElementById("fig-" + el.dataset.chart).textContent);
    if (!spec.data.length || spec.data.every(function (t) { return !(t.x || []).length; })) {
      spec.layout.annotations = [{ text: "No data in this range", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5 }];
    }
    Plotly.newPlot(el, spec.data, spec.layout, { displaylogo: false, responsive: true })
      .then(function () { el.dataset.rendered = "1"; done(); });
  });
});
