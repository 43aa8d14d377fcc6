"""A self-contained interactive HTML flame graph.

One file, no network: the call tree is embedded as JSON and drawn on a
``<canvas>``, so it stays responsive with hundreds of thousands of frames
(only frames wider than a fraction of a pixel are drawn; labels only where
they fit). Click a frame to zoom into it, click the bottom frame (or press
Esc, or *Reset*) to zoom out; type a regular expression into *Search* to
highlight matching frames and see their share; hover for the frame's weight
in absolute terms and as a percentage of everything and of the zoomed frame.

For scripting and tests the page exposes ``window.flamegraph`` with
``zoom(i)``, ``reset()``, ``search(text)``, ``find(name)``, ``frameAt(i)``
and ``state()``; ``#search=TEXT`` in the URL starts with a search.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

from asprof.jfr.profile import Profile
from asprof.jfr.views.tree import Node, build_tree

__all__ = ["to_html"]


def _flatten(root: Node) -> Tuple[List[str], List[int]]:
    """Names and a flat ``[name, type, level, total] * n`` preorder of the tree."""
    names: List[str] = []
    index: Dict[str, int] = {}
    flat: List[int] = []
    stack: List[Tuple[Node, int]] = [(root, 0)]
    while stack:
        node, level = stack.pop()
        i = index.get(node.name)
        if i is None:
            i = index[node.name] = len(names)
            names.append(node.name)
        flat += (i, node.display_type(), level, node.total)
        if node.children:
            kids = sorted(node.children.values(), key=lambda n: (n.name, n.type), reverse=True)
            stack.extend((k, level + 1) for k in kids)
    return names, flat


_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_SCRIPT_UNSAFE = re.compile("[<>&\u2028\u2029]")
_PLACEHOLDER = re.compile(r"%%(TITLE|META|NAMES|TREE)%%")


def _script_json(obj: object) -> str:
    """JSON safe inside a ``<script>`` element: ``<``, ``>``, ``&`` (and the two line
    separators) as ``\\u`` escapes, so no name can close the element (``</script>``), open a
    comment (``<!--``) or end the line of a string."""
    import json

    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return _SCRIPT_UNSAFE.sub(lambda m: _SCRIPT_ESCAPES[m.group(0)], text)


def _fill(template: str, values: Dict[str, str]) -> str:
    """The template with each ``%%NAME%%`` replaced, in one pass: a value that contains a
    placeholder (a frame or file named ``%%NAMES%%``) is never filled in again."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def to_html(profile: Profile, title: Optional[str] = None, min_weight: int = 0) -> str:
    """The profile as one self-contained HTML page with an interactive flame graph."""
    import html
    from datetime import datetime, timezone

    root = build_tree(profile, min_weight)
    names, flat = _flatten(root)
    kind_titles = {"cpu": "CPU profile", "wall": "Wall-clock profile", "nativemem": "Native memory allocations",
                   "leaks": "Native memory leaks"}
    if title is None:
        title = kind_titles.get(profile.kind, "Flame graph")
    started = ""
    if profile.start_nanos:
        started = datetime.fromtimestamp(profile.start_nanos / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    meta = {
        "title": title,
        "kind": profile.kind,
        "unit": profile.unit,
        "interval": profile.interval_ns or 0,
        "source": profile.source,
        "start": started,
        "durationNs": max(0, profile.end_nanos - profile.start_nanos),
        "events": profile.total_count,
    }
    return _fill(_TEMPLATE, {
        "TITLE": html.escape(title),
        "META": _script_json(meta),
        "NAMES": _script_json(names),
        "TREE": _script_json(flat),
    })


_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%%TITLE%%</title>
<style>
  :root { --fg: #1d1d1f; --muted: #666; --bg: #fff; --bar: #f3f3f5; --accent: #c0008a; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 13px/1.4 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
         color: var(--fg); background: var(--bg); }
  header { position: sticky; top: 0; z-index: 2; background: var(--bar); border-bottom: 1px solid #ddd;
           padding: 6px 12px; display: flex; flex-wrap: wrap; align-items: center; gap: 8px 16px; }
  header h1 { font-size: 15px; margin: 0; font-weight: 600; }
  header .info { color: var(--muted); }
  header .spacer { flex: 1; }
  header input { font: inherit; padding: 3px 6px; width: 18em; border: 1px solid #bbb; border-radius: 4px; }
  header button { font: inherit; padding: 3px 10px; border: 1px solid #bbb; border-radius: 4px;
                  background: #fff; cursor: pointer; }
  header button:hover { background: #eee; }
  #status { color: var(--muted); min-width: 10em; }
  #matched { color: var(--accent); font-weight: 600; }
  #legend span { display: inline-block; margin-right: 10px; white-space: nowrap; }
  #legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; vertical-align: -1px;
              border-radius: 2px; }
  #wrap { padding: 8px 12px 16px; }
  canvas { display: block; width: 100%; cursor: pointer; }
  #tip { position: fixed; z-index: 3; pointer-events: none; display: none; max-width: 640px;
         background: rgba(255,255,255,.97); border: 1px solid #aaa; border-radius: 4px; padding: 6px 8px;
         box-shadow: 0 2px 8px rgba(0,0,0,.15); word-break: break-all; }
  #tip b { display: block; margin-bottom: 2px; }
  #tip .k { color: var(--muted); }
  #crumbs { color: var(--muted); padding: 2px 0 6px; word-break: break-all; }
  #empty { padding: 40px; color: var(--muted); display: none; }
</style>
</head>
<body>
<header>
  <h1 id="title"></h1>
  <span class="info" id="info"></span>
  <span class="spacer"></span>
  <input id="search" type="search" placeholder="Search (regex)" aria-label="Search frames" autocomplete="off">
  <button id="clear" type="button" title="Clear the search">Clear</button>
  <button id="reset" type="button" title="Zoom out to everything (Esc)">Reset zoom</button>
  <button id="flip" type="button" title="Root at the top / bottom">Flip</button>
  <span id="matched"></span>
</header>
<div id="wrap">
  <div id="legend"></div>
  <div id="crumbs"></div>
  <canvas id="canvas" height="16"></canvas>
  <div id="empty">No samples matched.</div>
</div>
<div id="tip"></div>
<script>
"use strict";
const META = %%META%%;
const NAMES = %%NAMES%%;
const TREE = %%TREE%%;
(function () {
  const ROW = 16;
  const TYPES = {
    0: ["Interpreted", [140, 210, 140]], 1: ["JIT compiled", [80, 200, 80]], 2: ["Inlined", [80, 195, 195]],
    3: ["Native", [230, 110, 90]], 4: ["C++", [205, 195, 70]], 5: ["Kernel", [230, 140, 30]],
    6: ["C1 compiled", [185, 220, 110]], 7: ["Python", [95, 160, 230]], 100: ["Thread", [185, 160, 230]], "-1": ["Unknown", [190, 190, 190]]
  };
  const n = TREE.length / 4;
  const name = new Int32Array(n), type = new Int32Array(n), level = new Int32Array(n);
  const total = new Float64Array(n), x = new Float64Array(n), self = new Float64Array(n);
  const parent = new Int32Array(n);
  let maxLevel = 0;
  const cursor = [0], parents = [-1];
  for (let i = 0; i < n; i++) {
    name[i] = TREE[4 * i]; type[i] = TREE[4 * i + 1]; const l = level[i] = TREE[4 * i + 2];
    total[i] = TREE[4 * i + 3];
    x[i] = cursor[l]; cursor[l] += total[i]; cursor[l + 1] = x[i];
    parent[i] = l > 0 ? parents[l - 1] : -1; parents[l] = i;
    self[i] = total[i];
    if (parent[i] >= 0) self[parent[i]] -= total[i];
    if (l > maxLevel) maxLevel = l;
  }
  const levels = [];
  for (let l = 0; l <= maxLevel; l++) levels.push([]);
  for (let i = 0; i < n; i++) levels[level[i]].push(i);
  const grand = n ? total[0] : 0;

  const $ = (id) => document.getElementById(id);
  const canvas = $("canvas"), ctx = canvas.getContext("2d"), tip = $("tip");
  let zoom = 0, flipped = false, matches = null, hover = -1, width = 0, matchRe = null;

  function fmt(v) {
    if (META.unit === "bytes") {
      const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let k = 0;
      while (Math.abs(v) >= 1024 && k < u.length - 1) { v /= 1024; k++; }
      return (k ? v.toFixed(1) : String(v)) + " " + u[k];
    }
    if (META.unit === "objects") return Math.round(v).toLocaleString("en-US") + (v === 1 ? " object" : " objects");
    let s = Math.round(v).toLocaleString("en-US") + (v === 1 ? " sample" : " samples");
    if (META.interval) s += " (" + fmtTime(v * META.interval) + ")";
    return s;
  }
  function fmtTime(ns) {
    if (ns >= 1e9) return (ns / 1e9).toFixed(2) + " s";
    if (ns >= 1e6) return (ns / 1e6).toFixed(1) + " ms";
    return (ns / 1e3).toFixed(0) + " \u00b5s";
  }
  function pct(a, b) { return b > 0 ? (100 * a / b).toFixed(2) + "%" : "0%"; }
  function hash(s) { let h = 0; for (let i = 0; i < s.length; i++) h = (h * 31 + s.charCodeAt(i)) | 0; return h; }
  const colorCache = new Map();
  function color(i) {
    const key = name[i] * 128 + type[i];
    let c = colorCache.get(key);
    if (!c) {
      const base = (TYPES[type[i]] || TYPES["-1"])[1];
      const v = (hash(NAMES[name[i]]) & 31) - 16;
      c = "rgb(" + base.map((b) => Math.max(0, Math.min(255, b + v))).join(",") + ")";
      colorCache.set(key, c);
    }
    return c;
  }

  $("title").textContent = META.title;
  const infoBits = [];
  if (META.source) infoBits.push(META.source);
  if (META.start) infoBits.push(META.start);
  if (META.durationNs) infoBits.push(fmtTime(META.durationNs));
  infoBits.push("total " + fmt(grand));
  $("info").textContent = infoBits.join(" \u00b7 ");
  const seen = new Set(Array.from(type));
  $("legend").innerHTML = Object.keys(TYPES).filter((t) => seen.has(Number(t))).map((t) =>
    '<span><i style="background:rgb(' + TYPES[t][1].join(",") + ')"></i>' + TYPES[t][0] + "</span>").join("");
  if (grand <= 0) { $("empty").style.display = "block"; canvas.style.display = "none"; }

  function isAncestor(a, b) { // a is an ancestor of (or equal to) b
    while (b >= 0 && level[b] >= level[a]) { if (b === a) return true; b = parent[b]; }
    return false;
  }
  function firstVisible(arr, xmin) { // first index whose frame ends after xmin
    let lo = 0, hi = arr.length;
    while (lo < hi) { const m = (lo + hi) >> 1; const i = arr[m]; if (x[i] + total[i] <= xmin) lo = m + 1; else hi = m; }
    return lo;
  }
  function rowY(l) { return flipped ? l * ROW : (maxLevel - l) * ROW; }

  function draw() {
    const dpr = window.devicePixelRatio || 1;
    width = canvas.clientWidth || (document.body.clientWidth - 24);
    const height = (maxLevel + 1) * ROW;
    canvas.style.height = height + "px";
    canvas.width = Math.floor(width * dpr); canvas.height = Math.floor(height * dpr);
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "12px Menlo, Consolas, 'DejaVu Sans Mono', monospace";
    ctx.textBaseline = "middle";
    const xmin = x[zoom], span = total[zoom] || 1, scale = width / span, xmax = xmin + span;
    const charW = ctx.measureText("m").width || 7;
    for (let l = 0; l <= maxLevel; l++) {
      const arr = levels[l];
      const y = rowY(l);
      for (let k = firstVisible(arr, xmin); k < arr.length; k++) {
        const i = arr[k];
        if (x[i] >= xmax) break;
        let px = (x[i] - xmin) * scale, pw = total[i] * scale;
        if (px < 0) { pw += px; px = 0; }
        if (px + pw > width) pw = width - px;
        if (pw < 0.4) {
          // too narrow to see; a search hit still gets a 1-pixel mark so it can be found
          if (matches && matches[i] && l >= level[zoom]) { ctx.fillStyle = "#ee00aa"; ctx.fillRect(Math.floor(px), y, 1, ROW - 1); }
          continue;
        }
        const below = l < level[zoom];
        ctx.globalAlpha = below ? 0.55 : 1;
        ctx.fillStyle = matches && matches[i] ? "#ee00aa" : color(i);
        ctx.fillRect(px, y, Math.max(pw - 0.5, 0.4), ROW - 1);
        if (pw > 3 * charW) {
          let s = NAMES[name[i]];
          const fit = Math.floor((pw - 6) / charW);
          if (s.length > fit) s = fit > 2 ? s.slice(0, fit - 2) + ".." : "";
          if (s) { ctx.fillStyle = "#000"; ctx.fillText(s, px + 3, y + ROW / 2); }
        }
      }
    }
    ctx.globalAlpha = 1;
    if (hover >= 0) {
      const b = box(hover);
      if (b) { ctx.strokeStyle = "#000"; ctx.lineWidth = 1; ctx.strokeRect(b[0] + 0.5, b[1] + 0.5, Math.max(b[2] - 1, 1), ROW - 2); }
    }
    const path = [];
    for (let i = zoom; i > 0; i = parent[i]) path.push(NAMES[name[i]]);
    $("crumbs").textContent = zoom ? "Zoomed into: " + path.reverse().join(" \u25b8 ") : "";
  }
  function box(i) {
    const xmin = x[zoom], scale = width / (total[zoom] || 1);
    let px = (x[i] - xmin) * scale, pw = total[i] * scale;
    if (px < 0) { pw += px; px = 0; }
    if (px + pw > width) pw = width - px;
    if (pw <= 0) return null;
    return [px, rowY(level[i]), pw];
  }
  function frameAtPoint(ox, oy) {
    const l = flipped ? Math.floor(oy / ROW) : maxLevel - Math.floor(oy / ROW);
    if (l < 0 || l > maxLevel) return -1;
    const xmin = x[zoom], span = total[zoom] || 1;
    const xv = xmin + ox / width * span;
    const arr = levels[l];
    const k = firstVisible(arr, xv);
    if (k < arr.length) {
      const i = arr[k];
      if (x[i] <= xv && xv < x[i] + total[i]) {
        if (l < level[zoom] && !isAncestor(i, zoom)) return -1;
        return i;
      }
    }
    return -1;
  }

  function setZoom(i) { zoom = (i >= 0 && i < n) ? i : 0; hover = -1; draw(); updateMatched(); }
  function reset() { setZoom(0); }

  function setSearch(q) {
    $("search").value = q || "";
    if (!q) { matches = null; matchRe = null; draw(); updateMatched(); return; }
    let re;
    try { re = new RegExp(q); } catch (e) { re = new RegExp(q.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")); }
    matchRe = re;
    const hit = new Uint8Array(NAMES.length);
    for (let k = 0; k < NAMES.length; k++) hit[k] = re.test(NAMES[k]) ? 1 : 0;
    matches = new Uint8Array(n);
    for (let i = 0; i < n; i++) matches[i] = hit[name[i]];
    draw(); updateMatched();
  }
  function matchedWeight() {
    if (!matches) return 0;
    // sum of matched frames that have no matched ancestor, inside the zoomed frame
    let sum = 0;
    const end = x[zoom] + total[zoom];
    const covered = [];
    for (let i = zoom; i < n; i++) {
      if (i > zoom && level[i] <= level[zoom]) break;
      if (!matches[i]) continue;
      let p = parent[i], under = false;
      while (p >= 0 && p !== parent[zoom]) { if (matches[p]) { under = true; break; } p = parent[p]; }
      if (!under && x[i] < end) sum += total[i];
    }
    return sum;
  }
  function updateMatched() {
    const el = $("matched");
    if (!matches) { el.textContent = ""; return; }
    const w = matchedWeight();
    el.textContent = "Matched: " + pct(w, total[zoom]) + " (" + fmt(w) + ")";
  }

  function showTip(i, cx, cy) {
    if (i < 0) { tip.style.display = "none"; return; }
    const t = (TYPES[type[i]] || TYPES["-1"])[0];
    let h = "<b></b>";
    tip.innerHTML = h;
    tip.firstChild.textContent = NAMES[name[i]];
    const rows = [
      ["Type", t],
      ["Total", fmt(total[i]) + " \u2014 " + pct(total[i], grand) + " of all" +
        (zoom ? ", " + pct(total[i], total[zoom]) + " of zoomed" : "")],
      ["Self", fmt(self[i]) + " \u2014 " + pct(self[i], grand)],
    ];
    for (const r of rows) {
      const d = document.createElement("div");
      const k = document.createElement("span"); k.className = "k"; k.textContent = r[0] + ": ";
      d.appendChild(k); d.appendChild(document.createTextNode(r[1])); tip.appendChild(d);
    }
    tip.style.display = "block";
    const tw = tip.offsetWidth, th = tip.offsetHeight;
    tip.style.left = Math.min(cx + 14, window.innerWidth - tw - 4) + "px";
    tip.style.top = (cy + 18 + th > window.innerHeight ? cy - th - 8 : cy + 18) + "px";
  }

  canvas.addEventListener("mousemove", (e) => {
    const r = canvas.getBoundingClientRect();
    const i = frameAtPoint(e.clientX - r.left, e.clientY - r.top);
    if (i !== hover) { hover = i; draw(); }
    showTip(i, e.clientX, e.clientY);
  });
  canvas.addEventListener("mouseleave", () => { hover = -1; tip.style.display = "none"; draw(); });
  canvas.addEventListener("click", (e) => {
    const r = canvas.getBoundingClientRect();
    const i = frameAtPoint(e.clientX - r.left, e.clientY - r.top);
    if (i < 0) return;
    setZoom(i === zoom ? (parent[i] >= 0 ? parent[i] : 0) : i);
  });
  $("reset").addEventListener("click", reset);
  $("clear").addEventListener("click", () => setSearch(""));
  $("flip").addEventListener("click", () => { flipped = !flipped; draw(); });
  let searchTimer = 0;
  $("search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => setSearch($("search").value), 150);
  });
  $("search").addEventListener("keydown", (e) => { if (e.key === "Enter") setSearch($("search").value); });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { if (document.activeElement === $("search")) setSearch(""); else reset(); }
    if ((e.ctrlKey || e.metaKey) && e.key === "f") { e.preventDefault(); $("search").focus(); }
  });
  window.addEventListener("resize", draw);

  window.flamegraph = {
    zoom: setZoom, reset: reset, search: setSearch,
    find: (s) => { for (let i = 0; i < n; i++) if (NAMES[name[i]] === s) return i; return -1; },
    frameAt: (i) => ({ name: NAMES[name[i]], type: type[i], level: level[i], total: total[i], self: self[i] }),
    box: (i) => { const b = box(i); return b && { x: b[0], y: b[1], w: b[2], h: ROW }; },
    state: () => ({ zoom: zoom, frames: n, depth: maxLevel, total: grand,
                    matched: matches ? matchedWeight() : null,
                    matchedText: $("matched").textContent, search: matchRe ? matchRe.source : null }),
  };
  const m = /[#&]search=([^&]*)/.exec(location.hash);
  draw();
  if (m) setSearch(decodeURIComponent(m[1]));
})();
</script>
</body>
</html>
"""
