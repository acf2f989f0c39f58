"""The static site's page skeleton, style sheet and table-sorting script (inline: no external assets)."""

from __future__ import annotations

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f0f0f0}th.sortable{cursor:pointer;user-select:none}th.sortable:after{content:" \\2195";color:#999}
th.asc:after{content:" \\25B2";color:#333}th.desc:after{content:" \\25BC";color:#333}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.published{background:#fbf7e8}
.badge{display:inline-block;padding:1px 6px;border-radius:8px;font-size:.8em;background:#dde7f5}
.badge.published{background:#f3d98b}.badge.warn{background:#f7c0b8}
.flags li{color:#8a1c0c}.muted{color:#777}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
"""

SORT_JS = """
(function(){
  function key(td){var v=td.getAttribute('data-sort');if(v===null)v=td.textContent.trim();
    var n=parseFloat(v);return isNaN(n)?{s:v.toLowerCase()}:{n:n};}
  function cmp(a,b){if(a.n!==undefined&&b.n!==undefined)return a.n-b.n;
    if(a.n!==undefined)return -1;if(b.n!==undefined)return 1;return a.s<b.s?-1:a.s>b.s?1:0;}
  document.querySelectorAll('table.sortable').forEach(function(table){
    var heads=table.querySelectorAll('th');
    heads.forEach(function(th,col){th.classList.add('sortable');th.addEventListener('click',function(){
      var asc=!th.classList.contains('asc');heads.forEach(function(h){h.classList.remove('asc','desc');});
      th.classList.add(asc?'asc':'desc');var body=table.tBodies[0];
      var rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(r1,r2){var c=cmp(key(r1.cells[col]),key(r2.cells[col]));return asc?c:-c;});
      rows.forEach(function(r){body.appendChild(r);});});});
  });
})();
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="icon" href="data:,">
<style>{css}</style>
</head>
<body>
{body}
<script>{js}</script>
</body>
</html>
"""
