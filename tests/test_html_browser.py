"""The HTML report in a real browser: Debian's headless chromium runs the page script, then the
dumped DOM is checked (plots drawn, table rows, sorting and filtering) and a screenshot saved.

Skipped, with the reason, where no chromium is installed (`apt-get install chromium`).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDTH, HEIGHT = 1280, 2000


def _chromium() -> str | None:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium found (apt-get install chromium); "
                                                          "the browser checks of the HTML report need one")


def _browser(tmp_path: Path, page: Path, *extra: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--virtual-time-budget=5000", *extra, page.resolve().as_uri()]
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def _dom(tmp_path: Path, page: Path) -> str:
    result = _browser(tmp_path, page, "--dump-dom")
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


class _Elements(HTMLParser):
    """Collects, per element id, the tags (with attributes) nested inside it and its text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, str | None]] = []
        self.inside: dict[str, list[tuple[str, dict[str, str]]]] = {}
        self.text: dict[str, str] = {}
        self.body: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "body":
            self.body = a
        for _, ident in self.stack:
            if ident:
                self.inside[ident].append((tag, a))
        ident = a.get("id")
        if ident:
            self.inside.setdefault(ident, [])
            self.text.setdefault(ident, "")
        if tag not in ("br", "meta", "input", "link", "img", "hr"):
            self.stack.append((tag, ident))

    def handle_startendtag(self, tag: str, attrs: list) -> None:
        a = {k: v or "" for k, v in attrs}
        for _, ident in self.stack:
            if ident:
                self.inside[ident].append((tag, a))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data: str) -> None:
        for _, ident in self.stack:
            if ident:
                self.text[ident] += data

    def tags(self, ident: str, tag: str, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.inside.get(ident, []) if t == tag and all(a.get(k) == v for k, v in attrs.items())]


def _parse(dom: str) -> _Elements:
    parser = _Elements()
    parser.feed(dom)
    return parser


def _end_to_end(models, prompts: list[str], new_tokens: int = 8) -> dict:
    """Greedy generations of both models: the end_to_end block the HTML report renders."""
    import torch

    items, matches, total = [], 0, 0
    for prompt in prompts:
        tokens = []
        for loaded in models:
            ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
            with torch.inference_mode():
                out = loaded.model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                            pad_token_id=loaded.tokenizer.eos_token_id)
            tokens.append([loaded.tokenizer.decode([int(i)]) for i in out[0, ids.shape[1]:]])
        pairs = list(zip(*tokens))
        first = next((i for i, (b, t) in enumerate(pairs) if b != t), None)
        matches += sum(1 for b, t in pairs if b == t)
        total += len(pairs)
        items.append({"prompt": prompt, "baseline_tokens": tokens[0], "target_tokens": tokens[1],
                      "first_divergent_position": first})
    return {"prompts": items, "token_match_rate": matches / total}


@pytest.fixture(scope="module")
def report(baseline_dump, bf16_dump, fp32_model, tiny_model_dir, prompts):
    from parity.backends.hf import load
    from parity.backends.spec import parse_spec
    from parity.compare.engine import compare
    from parity.compare.tolerance import TolerancePolicy

    data = json.loads(json.dumps(compare(baseline_dump, bf16_dump, policy=TolerancePolicy(atol=1e-2),  # a failing report
                                         decode=lambda i: fp32_model.tokenizer.decode([i])).to_json()))
    bf16 = load(tiny_model_dir, parse_spec("dtype=bfloat16,attn=sdpa"))
    data["end_to_end"] = _end_to_end((fp32_model, bf16), prompts)
    return data


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_report_renders_in_chromium_with_plots_table_and_screenshot(report, tmp_path):
    from parity.report.html import page_data, write_html

    page = tmp_path / "report.html"
    write_html(report, page)
    dom = _dom(tmp_path, page)
    el = _parse(dom)
    assert el.body.get("data-rendered") == "1", "the page script did not finish"
    assert 'class="warn draw-error"' not in dom, re.findall(r"Could not draw[^<]*", dom)
    assert el.text["verdict"].strip() == "FAIL"
    assert el.text["first-name"] == report["first_divergence"]["name"]
    pairs = report["pairs"]
    rows = [a for a in el.tags("pair-table", "tr") if "data-outcome" in a]
    assert len(rows) == len(pairs)
    assert [r["data-outcome"] for r in rows] == [p["outcome"] for p in pairs]
    assert el.text["pair-count"] == f"showing {len(pairs)} of {len(pairs)} pairs"

    kinds = len(page_data(report)["depth"])
    paths = [a for a in el.tags("depth-plots", "path") if a.get("class") == "series"]
    assert len(paths) == 3 * kinds and all(re.match(r"M[\d.]+ [\d.]+( L[\d.]+ [\d.]+)+$", a["d"]) for a in paths)
    assert len(el.tags("depth-plots", "circle")) == 3 * sum(len(s["points"]) for s in page_data(report)["depth"])
    assert el.tags("depth-plots", "path", **{"class": "ref"}), "the atol line is missing"
    cells = el.tags("heatmap-plot", "rect", **{"class": "cell"})
    heat = page_data(report)["heatmap"]
    assert len(cells) == len(heat["steps"]) * len(heat["columns"])
    assert {c["fill"] for c in cells} - {"#000"} and any(c.get("stroke") for c in cells)
    bars = [a for a in el.tags("positions-plots", "rect") if a.get("class") == "bar"]
    positions = report["first_divergence"]["positions"]
    assert len(bars) == 2 * len(positions["max_abs"]) and all(float(b["height"]) > 0 for b in bars)
    assert "\u2423" in el.text["positions-plots"] or "<s>" in el.text["positions-plots"]  # token labels
    e2e = report["end_to_end"]
    assert el.text["token-match-rate"].startswith(f"token match rate: {100 * e2e['token_match_rate']:.1f}%")
    assert len(el.tags("e2e", "span", **{"class": "rowlabel"})) == 2 * len(e2e["prompts"])

    shot = tmp_path / "report.png"
    result = _browser(tmp_path, page, f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}",
                      "--hide-scrollbars")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    assert _png_size(shot) == (WIDTH, HEIGHT)
    assert shot.stat().st_size > 80_000  # a blank or text-only page compresses far below this


_DRIVER = """
<script>
(function () {
  var out = {};
  function names() {                     // the pair index (first column) of every visible row
    return Array.prototype.filter.call(document.querySelectorAll("#pair-table tbody tr"), function (r) {
      return !r.hidden; }).map(function (r) { return Number(r.cells[0].textContent); });
  }
  var headers = document.querySelectorAll("#pair-table thead button");
  headers[6].click();                     // rel L2: first click sorts worst first
  out.relDesc = names();
  out.relSort = document.querySelectorAll("#pair-table thead th")[6].getAttribute("aria-sort");
  headers[6].click();                     // second click: ascending
  out.relAsc = names();
  headers[4].click();                     // name, ascending
  out.byName = names();
  var sel = document.getElementById("filter-outcome");
  sel.value = "fail"; sel.dispatchEvent(new Event("change"));
  out.failOutcomes = names();
  var input = document.getElementById("filter-name");
  input.value = "Post_Attention"; input.dispatchEvent(new Event("input"));
  out.failMlp = names();
  out.count = document.getElementById("pair-count").textContent;
  sel.value = ""; sel.dispatchEvent(new Event("change"));
  input.value = ""; input.dispatchEvent(new Event("input"));
  out.all = names().length;
  document.body.setAttribute("data-driver", JSON.stringify(out));
})();
</script>
"""


def test_table_sorts_by_header_click_and_filters_by_outcome_and_name(report, tmp_path):
    """The page as written, plus a test driver script appended that clicks and types like a user."""
    from parity.report.html import render_html

    page = tmp_path / "driven.html"
    page.write_text(render_html(report).replace("</body>", _DRIVER + "</body>"), encoding="utf-8")
    el = _parse(_dom(tmp_path, page))
    out = json.loads(el.body["data-driver"])
    pairs = report["pairs"]
    rel = [p["metrics"]["rel_l2"] for p in pairs]
    assert out["relDesc"] == sorted(range(len(pairs)), key=lambda i: (-rel[i], i))
    assert out["relSort"] == "descending"
    assert out["relAsc"] == sorted(range(len(pairs)), key=lambda i: (rel[i], i))
    assert out["byName"] == sorted(range(len(pairs)), key=lambda i: (pairs[i]["name"], i))
    assert [pairs[i]["outcome"] for i in out["failOutcomes"]] == ["fail"] * report["summary"]["outcomes"]["fail"]
    expected = [i for i, p in enumerate(pairs) if p["outcome"] == "fail" and "post_attention" in p["name"]]
    assert sorted(out["failMlp"]) == expected and expected
    assert out["count"] == f"showing {len(expected)} of {len(pairs)} pairs"
    assert out["all"] == len(pairs)


def test_hostile_record_names_are_shown_as_text_never_run(report, tmp_path):
    from parity.report.html import write_html

    data = copy.deepcopy(report)
    payloads = ["<img src=x onerror=\"document.body.setAttribute('data-pwned','img')\">",
                "</script><script>document.body.setAttribute('data-pwned','script')</script>",
                "\"><svg onload=\"document.body.setAttribute('data-pwned','svg')\">"]
    for pair, payload in zip(data["pairs"], payloads):
        pair["name"] = payload
    data["first_divergence"]["positions"]["tokens"][0] = payloads[0]
    data["end_to_end"]["prompts"][0]["prompt"] = payloads[1]
    page = tmp_path / "hostile.html"
    write_html(data, page)
    dom = _dom(tmp_path, page)
    el = _parse(dom)
    assert "data-pwned" not in el.body and el.body.get("data-rendered") == "1"
    assert "<img" not in dom and "<svg onload" not in dom  # serialized as text (&lt;img ...)
    shown = [a for a in el.tags("pair-table", "td") if a.get("class") == "name mono"]
    assert len(shown) == len(data["pairs"])
    assert all(payload in el.text["pair-table"] for payload in payloads)
