"""The inline style sheet and script of the HTML report (:mod:`bnfuse.report_html`).

The script only sorts and filters tables; the page is complete without it.
"""

from __future__ import annotations

__all__ = ["CSS", "SCRIPT"]

CSS = """
:root { --fg: #1d2330; --muted: #5b6473; --line: #dde1e8; --bg: #f6f7f9;
  --good: #1a7f37; --bad: #c62828; --warn: #9a6700; --accent: #1f77b4; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 24px 40px; }
h1 { font-size: 22px; margin: 8px 0 6px; }
h2 { font-size: 17px; margin: 0 0 10px; }
h3 { font-size: 14px; margin: 16px 0 6px; color: var(--muted); }
section { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 16px 18px; margin: 16px 0; }
code { font: 12.5px/1.3 ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  overflow-wrap: anywhere; }
.status { padding: 8px 12px; border-radius: 6px; background: #fff;
  border: 1px solid var(--line); border-left: 5px solid var(--muted); overflow-wrap: anywhere; }
.status.good { border-left-color: var(--good); }
.status.bad { border-left-color: var(--bad); }
.status.warn { border-left-color: var(--warn); }
.good { color: var(--good); } .bad { color: var(--bad); } .warn { color: var(--warn); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(250px, 1fr)); gap: 10px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 9px 12px; min-width: 0; }
.card .label { font-size: 11.5px; text-transform: uppercase; letter-spacing: .04em;
  color: var(--muted); }
.card .value { font-size: 16px; font-weight: 600; overflow-wrap: anywhere; }
.card .sub { font-size: 12px; color: var(--muted); overflow-wrap: anywhere; }
.card.good .value { color: var(--good); } .card.bad .value { color: var(--bad); }
.card.warn .value { color: var(--warn); }
.scroll { overflow: auto; max-width: 100%; }
.scroll.tall { max-height: 70vh; border: 1px solid var(--line); border-radius: 6px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
table.compact { width: auto; min-width: 40%; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th.num, td.num { text-align: right; }
thead th { position: sticky; top: 0; background: #eef1f5; z-index: 1; }
table.sortable thead th { white-space: nowrap; }
table.wide { font-size: 12px; }
table.wide td { white-space: nowrap; }
table.kv th { background: none; font-weight: 500; color: var(--muted); position: static; }
table.sortable thead th { cursor: pointer; user-select: none; }
table.sortable thead th::after { content: " \\2195"; color: #a0a7b3; font-size: 11px; }
table.sortable thead th[aria-sort="ascending"]::after { content: " \\2191"; color: var(--fg); }
table.sortable thead th[aria-sort="descending"]::after { content: " \\2193"; color: var(--fg); }
tbody tr:hover { background: #f3f6fb; }
#bn-table td:nth-child(2) { min-width: 14em; }
#bn-table td:nth-child(5) { min-width: 16em; }
.filters { display: flex; gap: 8px; align-items: center; margin: 0 0 8px; flex-wrap: wrap; }
.filters input { flex: 1 1 260px; padding: 6px 8px; border: 1px solid #c4cad4; border-radius: 5px;
  font: inherit; }
.filters select { padding: 5px 6px; border: 1px solid #c4cad4; border-radius: 5px; font: inherit; }
.count, .hint, figcaption, footer { color: var(--muted); font-size: 12px; }
figure { margin: 12px 0; }
svg.chart { width: 100%; max-width: 900px; height: auto; display: block; }
ul.notes { margin: 8px 0; padding-left: 20px; }
p.note { background: #fff8e1; border: 1px solid #f0dca0; padding: 8px 10px; border-radius: 6px; }
nav a { color: var(--accent); text-decoration: none; }
footer { margin-top: 24px; text-align: center; }
"""

SCRIPT = """
(function () {
  "use strict";
  function compare(a, b) {
    var x = a.getAttribute("data-sort"), y = b.getAttribute("data-sort");
    if (x !== null && y !== null) { return parseFloat(x) - parseFloat(y); }
    return a.textContent.trim().localeCompare(b.textContent.trim(), undefined,
      { numeric: true, sensitivity: "base" });
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = table.querySelectorAll("thead th");
    heads.forEach(function (th, col) {
      th.tabIndex = 0;
      th.setAttribute("aria-sort", "none");
      function sort() {
        var asc = th.getAttribute("aria-sort") !== "ascending";
        heads.forEach(function (h) { h.setAttribute("aria-sort", "none"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          return (asc ? 1 : -1) * compare(a.cells[col], b.cells[col]);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); }
      });
    });
  });
  document.querySelectorAll(".filters").forEach(function (box) {
    var table = document.getElementById(box.getAttribute("data-table"));
    if (!table) { return; }
    var text = box.querySelector(".filter-text");
    var status = box.querySelector(".filter-status");
    var count = box.querySelector(".count");
    function apply() {
      var q = text.value.trim().toLowerCase(), s = status.value, shown = 0;
      var rows = table.tBodies[0].rows;
      for (var i = 0; i < rows.length; i++) {
        var ok = (!s || rows[i].getAttribute("data-status") === s) &&
          (!q || rows[i].textContent.toLowerCase().indexOf(q) !== -1);
        rows[i].hidden = !ok;
        if (ok) { shown++; }
      }
      count.textContent = shown + " of " + rows.length + " shown";
    }
    text.addEventListener("input", apply);
    status.addEventListener("change", apply);
  });
})();
"""
