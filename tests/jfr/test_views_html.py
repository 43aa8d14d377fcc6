"""The HTML flame graph in headless Chromium: it renders, a click zooms, search highlights,
tooltips show counts and percentages, reset zooms out -- also with 100k+ frames.

The page is driven by real DOM events (MouseEvent on the canvas, keyboard on the
search box) from a script appended to a copy of the page; Chromium's
``--dump-dom`` returns the results. No extra Python package is needed.
"""
from __future__ import annotations

import html as htmllib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict

import pytest

import asprof.jfr as J
from asprof.jfr.profile import Profile

import jfr_builder as B

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "chrome")
                 if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium/chrome binary: the browser test cannot run")

DRIVER = r"""
<script>
window.addEventListener("load", function () {
  const out = {};
  try {
    const fg = window.flamegraph, canvas = document.getElementById("canvas");
    out.initial = fg.state();
    // rendered: the canvas has painted pixels
    const ctx = canvas.getContext("2d");
    const img = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let painted = 0;
    for (let i = 3; i < img.length; i += 4) if (img[i] > 0) painted++;
    out.painted = painted;
    const target = fg.find(TARGET);
    out.target = target;
    const b = fg.box(target), r = canvas.getBoundingClientRect();
    const at = (type, x, y) => canvas.dispatchEvent(new MouseEvent(type, {bubbles: true, clientX: x, clientY: y}));
    const cx = r.left + b.x + Math.min(b.w / 2, 5), cy = r.top + b.y + b.h / 2;
    at("mousemove", cx, cy);
    const tip = document.getElementById("tip");
    out.tip = {visible: tip.style.display === "block", text: tip.textContent};
    at("click", cx, cy);
    out.zoomed = fg.state();
    out.targetBoxAfterZoom = fg.box(target);
    const search = document.getElementById("search");
    search.value = SEARCH;
    search.dispatchEvent(new KeyboardEvent("keydown", {key: "Enter", bubbles: true}));
    out.searched = fg.state();
    const img2 = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    let magenta = 0;
    for (let i = 0; i < img2.length; i += 4) if (img2[i] === 0xee && img2[i + 1] === 0 && img2[i + 2] === 0xaa) magenta++;
    out.highlightedPixels = magenta;
    document.getElementById("reset").click();
    out.reset = fg.state();
    out.matchedAll = document.getElementById("matched").textContent;
    const t0 = performance.now();
    for (let k = 0; k < 5; k++) { fg.zoom(k % 2 ? 0 : target); }
    out.drawMs = (performance.now() - t0) / 5;
  } catch (e) { out.error = String(e && e.stack || e); }
  const pre = document.createElement("pre"); pre.id = "result"; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def run_page(page: str, tmp: Path, target: str, search: str) -> Dict[str, Any]:
    driver = DRIVER.replace("TARGET", json.dumps(target)).replace("SEARCH", json.dumps(search))
    path = tmp / "page.html"
    path.write_text(page.replace("</body>", driver + "</body>"), encoding="utf-8")
    cmd = [CHROMIUM or "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--window-size=1280,900", f"--user-data-dir={tmp / 'profile'}",
           "--virtual-time-budget=10000", "--dump-dom", path.as_uri()]
    r = subprocess.run(cmd, capture_output=True, timeout=120)
    m = re.search(r'<pre id="result">(.*?)</pre>', r.stdout.decode("utf-8", "replace"), re.S)
    assert m, f"no result from chromium: {r.stderr.decode(errors='replace')[-2000:]}"
    res: Dict[str, Any] = json.loads(htmllib.unescape(m.group(1)))
    assert "error" not in res, res.get("error")
    return res


def sample_profile() -> Profile:
    s = B.Simple()
    s.thread(1, "main")
    for _ in range(6):
        s.exec_sample(1, 1, ["main", "compute", "hot_loop"])
    for _ in range(3):
        s.exec_sample(1, 1, ["main", "io", "read"])
    s.exec_sample(1, 1, ["main", "io", "write<T>&'\"</script>"])
    return J.open(s.build()).samples("cpu")


@needs_chromium
def test_renders_zooms_searches_and_resets(tmp_path: Path) -> None:
    page = J.to_html(sample_profile(), title="Test <profile>")
    assert "<title>Test &lt;profile&gt;</title>" in page
    assert "http://" not in page and "https://" not in page  # self-contained: no network
    res = run_page(page, tmp_path, "io", "^read$")
    assert res["initial"]["total"] == 10 and res["initial"]["zoom"] == 0
    assert res["painted"] > 1000
    tip = res["tip"]
    assert tip["visible"] and "io" in tip["text"] and "40.00%" in tip["text"] and "4 samples" in tip["text"]
    assert res["zoomed"]["zoom"] == res["target"]  # the click zoomed into "io"
    assert res["targetBoxAfterZoom"]["w"] > 1000  # ... which now spans the width
    assert res["searched"]["matched"] == 3 and res["searched"]["search"] == "^read$"
    assert "Matched: 75.00%" in res["searched"]["matchedText"]  # 3 of the 4 samples under "io"
    assert res["highlightedPixels"] > 100
    assert res["reset"]["zoom"] == 0
    assert "Matched: 30.00%" in res["matchedAll"]  # 3 of 10 after zooming out


def big_profile(n_leaves: int = 120_000) -> Profile:
    prof = Profile(kind="cpu", unit="samples")
    for i in range(n_leaves):
        a, b, c = i % 7, (i // 7) % 100, i
        stack = (prof.intern("main", 3), prof.intern(f"module{a}", 3), prof.intern(f"func{b}", 3),
                 prof.intern(f"leaf{c}", 3))
        prof.add(stack, 1 + i % 5, 1)
    return prof


@needs_chromium
def test_large_flame_graph_stays_usable(tmp_path: Path) -> None:
    prof = big_profile()
    page = J.to_html(prof)
    assert len(page) < 20_000_000
    res = run_page(page, tmp_path, "module3", "leaf1.*")
    assert res["initial"]["frames"] > 120_000
    assert res["painted"] > 1000
    assert res["zoomed"]["zoom"] == res["target"]
    assert res["searched"]["matched"] and res["highlightedPixels"] > 0
    assert res["drawMs"] < 1000, f"a redraw took {res['drawMs']:.0f} ms"


def test_html_escapes_and_embeds_data() -> None:
    page = J.to_html(sample_profile())
    # the frame name with </script> must not close the script element
    assert page.count("</script>") == 1
    assert "write\\u003cT\\u003e\\u0026'\\\"\\u003c/script\\u003e" in page
    assert "CPU profile" in page


def test_empty_profile_page() -> None:
    page = J.to_html(Profile(kind="wall", unit="samples"))
    assert "No samples matched." in page and "Wall-clock profile" in page


HOSTILE_NAMES = ["%%NAMES%%", "%%TREE%%</script><script>document.title='pwned'</script>",
                 "<!--<script>", "line\u2028sep\u2029x", "a&amp;b %%META%% %%TITLE%%"]


def hostile_profile() -> Profile:
    """Frame names, the file name and the title holding the template's placeholders and HTML."""
    s = B.Simple()
    s.thread(1, "main")
    for i, name in enumerate(HOSTILE_NAMES):
        for _ in range(i + 1):
            s.exec_sample(1, 1, ["main", name])
    prof = J.open(s.build()).samples("cpu")
    prof.source = "/profiles/%%NAMES%%/</script>%%TREE%%.jfr"
    return prof


def test_placeholders_and_html_in_names_are_filled_once_and_escaped() -> None:
    page = J.to_html(hostile_profile(), title="%%META%% <b>")
    assert page.count("</script>") == 1 and page.count("<script>") == 1
    assert "<!--" not in page.split("<script>", 1)[1]
    assert "\u2028" not in page and "\u2029" not in page
    script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    names = json.loads(re.search(r"const NAMES = (.*);\n", script).group(1))  # type: ignore[union-attr]
    assert set(HOSTILE_NAMES) <= set(names)
    meta = json.loads(re.search(r"const META = (.*);\n", script).group(1))  # type: ignore[union-attr]
    assert meta["source"] == "/profiles/%%NAMES%%/</script>%%TREE%%.jfr" and meta["title"] == "%%META%% <b>"
    assert "<title>%%META%% &lt;b&gt;</title>" in page


@needs_chromium
def test_page_with_hostile_names_renders_a_flame_graph(tmp_path: Path) -> None:
    page = J.to_html(hostile_profile(), title="%%META%% </script>")
    res = run_page(page, tmp_path, "%%NAMES%%", "NAMES")
    assert res["initial"]["total"] == 15 and res["painted"] > 1000
    assert res["target"] >= 0 and "%%NAMES%%" in res["tip"]["text"]
    assert res["zoomed"]["zoom"] == res["target"]
    assert res["searched"]["matched"] >= 1
