/* minichart.js: a tiny line chart as inline SVG, written for the validator dashboard
 * (no dependencies, nothing fetched). Usage:
 *   <div data-chart="ID"></div>
 *   <script type="application/json" id="ID">{"x": [ISO times], "ymin": 0, "ymax": 1,
 *     "series": [{"name": "score", "values": [numbers or null], "color": "#1f6feb"}]}</script>
 * Every element with data-chart is drawn on load; its data-points attribute is then
 * set to the number of points drawn. */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";

  function el(name, attrs, parent) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (parent) parent.appendChild(node);
    return node;
  }

  function fmtTime(t) {
    var d = new Date(t);
    return d.toISOString().slice(0, 16).replace("T", " ") + " UTC";
  }

  function line(container, data) {
    var width = container.clientWidth || 720, height = 260;
    var m = {top: 12, right: 16, bottom: 44, left: 44};
    var w = width - m.left - m.right, h = height - m.top - m.bottom;
    var xs = data.x.map(function (t) { return Date.parse(t); });
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    var ymin = data.ymin !== undefined ? data.ymin : 0, ymax = data.ymax !== undefined ? data.ymax : 1;
    function px(t) { return m.left + (x1 > x0 ? (t - x0) / (x1 - x0) * w : w / 2); }
    function py(v) { return m.top + h - (v - ymin) / (ymax - ymin || 1) * h; }

    var svg = el("svg", {viewBox: "0 0 " + width + " " + height, width: width, height: height,
                         role: "img", "class": "minichart"});
    container.innerHTML = "";
    container.appendChild(svg);  // in the document first, so text can be measured
    for (var i = 0; i <= 4; i++) {  // horizontal grid and y labels
      var v = ymin + (ymax - ymin) * i / 4;
      el("line", {x1: m.left, x2: m.left + w, y1: py(v), y2: py(v), "class": "grid"}, svg);
      el("text", {x: m.left - 6, y: py(v) + 4, "text-anchor": "end", "class": "axis"}, svg)
        .textContent = v.toFixed(2);
    }
    if (xs.length) {
      el("text", {x: m.left, y: height - 26, "class": "axis"}, svg).textContent = fmtTime(x0);
      el("text", {x: m.left + w, y: height - 26, "text-anchor": "end", "class": "axis"}, svg)
        .textContent = fmtTime(x1);
    }
    var drawn = 0, legendX = m.left;
    (data.series || []).forEach(function (s) {
      var color = s.color || "#1f6feb", path = [], pen = "M";
      s.values.forEach(function (v, i) {
        if (v === null || v === undefined) { pen = "M"; return; }
        path.push(pen + px(xs[i]).toFixed(1) + "," + py(v).toFixed(1));
        pen = "L";
      });
      el("path", {d: path.join(" "), fill: "none", stroke: color, "stroke-width": s.width || 2,
                  "class": "series series-" + s.name}, svg);
      s.values.forEach(function (v, i) {
        if (v === null || v === undefined) return;
        var dot = el("circle", {cx: px(xs[i]), cy: py(v), r: s.dots === false ? 0 : 3, fill: color,
                                "class": "point point-" + s.name}, svg);
        el("title", {}, dot).textContent = s.name + " " + v.toFixed(3) + " at " + fmtTime(xs[i]);
        drawn++;
      });
      el("rect", {x: legendX, y: height - 14, width: 10, height: 10, fill: color}, svg);
      var label = el("text", {x: legendX + 14, y: height - 5, "class": "legend"}, svg);
      label.textContent = s.name;
      legendX += 30 + label.getComputedTextLength();
    });
    container.setAttribute("data-points", String(drawn));
    return drawn;
  }

  window.MiniChart = {line: line};
  function drawAll() {
    document.querySelectorAll("[data-chart]").forEach(function (node) {
      var source = document.getElementById(node.getAttribute("data-chart"));
      line(node, JSON.parse(source.textContent));
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", drawAll);
  else drawAll();
})();
