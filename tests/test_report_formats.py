"""HTML / JUnit / Markdown writers and `parity report`, on real reports of the tiny model."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from parity.compare.tolerance import TolerancePolicy
from parity.errors import UsageError

PARITY = [sys.executable, "-m", "parity.cli"]
#: The bfloat16 default without its scale floor: fp32 vs bf16 of the tiny model then fails (a failing report).
PLAIN_BF16 = TolerancePolicy(atol=1e-2)


@pytest.fixture(scope="module")
def report(baseline_dump, bf16_dump, fp32_model):
    """fp32 vs bf16 report dict, as read back from a JSON file (non-finite floats as strings)."""
    from parity.compare.engine import compare

    result = compare(baseline_dump, bf16_dump, decode=lambda i: fp32_model.tokenizer.decode([i]), policy=PLAIN_BF16)
    return json.loads(json.dumps(result.to_json()))


@pytest.fixture(scope="module")
def allowed_report(baseline_dump, bf16_dump):
    from parity.compare.engine import compare

    return json.loads(json.dumps(compare(baseline_dump, bf16_dump, policy=PLAIN_BF16,
                                         allow_failed=["**.post_attention_layernorm"]).to_json()))


@pytest.fixture(scope="module")
def pass_report(baseline_dump):
    from parity.compare.engine import compare

    return json.loads(json.dumps(compare(baseline_dump, baseline_dump).to_json()))


def _not_ok(pair: dict) -> bool:
    return not (pair["outcome"] in ("identical", "pass", "noise") or pair["allowed"])


def _worst_by_name(report: dict) -> dict[str, float]:
    worst: dict[str, float] = {}
    for pair in report["pairs"]:
        if pair["metrics"]:
            worst[pair["name"]] = max(worst.get(pair["name"], 0.0), pair["metrics"]["rel_l2"])
    return worst


# ------------------------------------------------------------------------------------------ JUnit

def test_junit_has_one_testcase_per_pair_and_failures_carry_reason_metrics_tolerance(report, tmp_path):
    from parity.report.junit import write_junit

    path = tmp_path / "out" / "junit.xml"
    write_junit(report, path)
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    pairs = report["pairs"]
    assert len(cases) == len(pairs) == int(suite.get("tests")) == int(root.get("tests"))
    failures = [c for c in cases if c.find("failure") is not None]
    assert len(failures) == int(suite.get("failures")) == report["summary"]["failed"] > 0
    assert suite.findall("testcase/skipped") == []
    for case, pair in zip(cases, pairs):
        assert case.get("name") == f"{pair['name']} @ step {pair['step']}"
        if pair["layer"] is not None:
            kind = re.sub(r"\.layers\.\d+", ".layers.{i}", pair["name"], count=1)
            assert case.get("classname") == f"{kind} / layer {pair['layer']}"
        failure = case.find("failure")
        assert (failure is not None) == _not_ok(pair)
        if failure is not None:
            assert failure.get("type") == pair["outcome"]
            assert pair["reason"] in failure.get("message")
            assert "tolerance: rtol=0.05 atol=0.01 (--atol 0.01 (rest: default for bfloat16))" in failure.text
            assert f"rel_l2={pair['metrics']['rel_l2']}" in failure.text
            assert "would pass with: atol>=" in failure.text
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["verdict"] == "fail" and props["first_divergence"].startswith(report["first_divergence"]["name"])
    assert not [p for p in path.parent.iterdir() if p.name != "junit.xml"]  # no temp file left


def test_junit_allowed_pairs_are_skipped_and_hostile_names_stay_valid_xml(allowed_report, tmp_path):
    from parity.report.junit import write_junit

    data = copy.deepcopy(allowed_report)
    hostile = "evil\x01]]></failure><x a='1'>&amp;<!--"
    data["pairs"][0]["name"] = hostile
    write_junit(data, tmp_path / "j.xml")
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    skipped = suite.findall("testcase/skipped")
    assert len(skipped) == int(suite.get("skipped")) == data["summary"]["allowed"] > 0
    assert int(suite.get("failures")) == data["summary"]["failed"]
    assert all(s.get("message").startswith("allowed fail:") for s in skipped)
    assert suite.find("testcase").get("name") == "evil\\x01]]></failure><x a='1'>&amp;<!-- @ step 0"


# --------------------------------------------------------------------------------------- Markdown

def test_markdown_summary_has_verdict_first_divergence_worst_taps_and_counts(report, tmp_path):
    from parity.report.markdown import write_markdown
    from parity.report.terminal import g_up

    write_markdown(report, tmp_path / "summary.md")
    text = (tmp_path / "summary.md").read_text(encoding="utf-8")
    first = report["first_divergence"]
    summary = report["summary"]
    assert text.startswith(f"### parity: ❌ FAIL — {summary['passed']} of {summary['pairs']} pairs passed, "
                           f"{summary['failed']} failed")
    assert f"**First divergence:** `{first['name']}` — step {first['step']}, layer {first['layer']}" in text
    assert "tolerance: rtol=0.05 atol=0.01 (--atol 0.01 (rest: default for bfloat16))" in text
    assert f"needed: atol ≥ {g_up(first['needed']['atol'])} at this rtol" in text
    rows = [line for line in text.splitlines() if re.match(r"^\| (\d+|–) \| `", line)]
    assert len(rows) == 10
    worst = sorted(_worst_by_name(report).items(), key=lambda kv: -kv[1])[:10]
    assert [re.search(r"`([^`]+)`", row).group(1) for row in rows] == [name for name, _ in worst]
    assert f"| {worst[0][1]:.3g} |" in rows[0]
    counts = f"Counts: pass {summary['passed']} · fail {summary['outcomes']['fail']} (of {summary['pairs']} pairs)"
    assert counts in text
    assert "End to end" not in text  # no end_to_end key


def test_markdown_end_to_end_rate_and_hostile_names(report, tmp_path):
    from parity.report.markdown import render_markdown

    data = copy.deepcopy(report)
    data["end_to_end"] = {"prompts": [
        {"prompt": "a", "baseline_tokens": ["x", "y"], "target_tokens": ["x", "z"], "first_divergent_position": 1},
        {"prompt": "b", "baseline_tokens": ["x"], "target_tokens": ["x"], "first_divergent_position": None}],
        "token_match_rate": 0.75, "verdicts": {"identical": 1, "benign flip": 1, "real divergence": 0},
        "distributions": {"positions": 9, "kl_mean": 2.5e-05, "kl_max": 7e-04, "top1_agreement": 1.0}}
    worst = max(_worst_by_name(report).items(), key=lambda kv: kv[1])[0]
    hostile = "a|b`c <img src=x onerror=alert(1)> @team"
    for pair in data["pairs"]:
        if pair["name"] == worst:
            pair["name"] = hostile
    text = render_markdown(data)
    assert ("**End to end:** token match rate 75.0% over 2 prompt(s); 1 generation(s) diverged (identical 1, "
            "benign flip 1, real divergence 0); teacher-forced KL(baseline‖target) mean 2.5e-05, "
            "top-1 agreement 100.0%") in text
    row = next(line for line in text.splitlines() if "onerror" in line)
    assert row.count("|") - row.count("\\|") == 8  # the table keeps its 7 columns
    assert "``a\\|b`c <img src=x onerror=alert(1)> @team``" in row  # inside a code span: inert


@pytest.fixture(scope="module")
def odd_report(tmp_path_factory):
    """A report with every awkward outcome: NaN, Inf (rel L2 = inf), shape mismatch, missing records."""
    import torch

    from parity.compare.engine import compare
    from parity.store.format import FORMAT_VERSION, Record, RunHeader
    from parity.store.writer import DumpWriter

    def write(path, tensors):
        writer = DumpWriter(path, RunHeader(format_version=FORMAT_VERSION), durable=False)
        writer.open()
        for order, (name, tensor) in enumerate(tensors.items()):
            writer.add(Record(name=name, step=0, rank=0, order=order, shape=tuple(tensor.shape),
                              dtype=str(tensor.dtype).removeprefix("torch."), file=None, key=name, stats={},
                              tags={}), tensor.contiguous())
        writer.close()

    root = tmp_path_factory.mktemp("odd")
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    nan = x.clone()
    nan[1, 2] = float("nan")
    write(root / "b", {"model.layers.0.mlp": x, "model.layers.1.mlp": torch.zeros(3, 4),
                       "model.layers.2.mlp": x, "only_baseline": x, "model.norm": x})
    write(root / "t", {"model.layers.0.mlp": nan, "model.layers.1.mlp": torch.ones(3, 4),
                       "model.layers.2.mlp": x[:2], "only_target": x, "model.norm": x})
    return json.loads(json.dumps(compare(root / "b", root / "t").to_json()))


def test_every_writer_handles_nonfinite_missing_and_mismatched_pairs(odd_report, tmp_path):
    from parity.commands.report_cmd import load_report, write_reports
    from parity.report.html import page_data, script_json
    from parity.report.markdown import worst_taps

    outcomes = {p["name"]: p["outcome"] for p in odd_report["pairs"]}
    assert outcomes == {"model.layers.0.mlp": "nonfinite", "model.layers.1.mlp": "degenerate",
                        "model.layers.2.mlp": "shape_mismatch", "only_baseline": "missing_in_target",
                        "only_target": "missing_in_baseline", "model.norm": "identical"}
    path = tmp_path / "odd.json"
    path.write_text(json.dumps(odd_report))
    written = write_reports(load_report(path), html=str(tmp_path / "o.html"), junit=str(tmp_path / "o.xml"),
                            markdown=str(tmp_path / "o.md"))
    assert [label for label, _ in written] == ["HTML", "JUnit XML", "Markdown"]
    suite = ET.parse(tmp_path / "o.xml").getroot().find("testsuite")
    assert int(suite.get("failures")) == 5 and int(suite.get("tests")) == 6
    assert {f.get("type") for f in suite.iter("failure")} == set(outcomes.values()) - {"identical"}
    data = page_data(odd_report)
    depth = {s["kind"]: s["points"] for s in data["depth"]}
    # layer 0: the NaN element is left out of the metrics (rel L2 0); layer 1: baseline all zero (inf);
    # layer 2: shape mismatch, no metrics (drawn as a gap)
    assert [p["rel_l2"] for p in depth["model.layers.{i}.mlp"]] == [0.0, "inf", None]
    assert [p["fail"] for p in depth["model.layers.{i}.mlp"]] == [True, True, True]
    assert json.loads(script_json(data)) == data  # strict JSON: non-finite values stay strings
    taps = worst_taps(odd_report)
    assert [t["name"] for t in taps[:4]] == ["model.layers.2.mlp", "only_baseline", "only_target",
                                             "model.layers.1.mlp"]  # without metrics first, then inf
    md = (tmp_path / "o.md").read_text()
    assert "| 1 | `model.layers.1.mlp` | inf | 0 |" in md and "| 2 | `model.layers.2.mlp` | – |" in md
    assert "1/1 (shape\\_mismatch)" in md


# ------------------------------------------------------------------------------------------- HTML

def test_html_is_self_contained_and_embeds_the_data_safely(report, tmp_path):
    from parity.report.html import page_data, write_html

    data = copy.deepcopy(report)
    hostile = "</script><script>alert(1)</script><!--"
    data["pairs"][1]["name"] = hostile
    write_html(data, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert len(page.encode()) < 1_000_000
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "alert(1)" in page and "<script>alert(1)" not in page
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
    assert urls <= {"http://www.w3.org/2000/svg"}  # the SVG namespace name only: nothing is fetched
    assert not re.search(r"\b(src|href)=\"(?!#)", page) and "@import" not in page
    assert "default-src 'none'" in page
    block = re.search(r'<script type="application/json" id="parity-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(block) == json.loads(json.dumps(page_data(data)))
    first = report["first_divergence"]
    assert f'<code id="first-name">{first["name"]}</code>' in page
    assert "default for bfloat16" in page and 'class="banner fail"' in page


def test_html_of_a_passing_report(pass_report, tmp_path):
    from parity.report.html import page_data, render_html

    page = render_html(pass_report)
    assert 'class="banner pass"' in page and ">PASS<" in page and "None: every pair passed" in page
    data = page_data(pass_report)
    assert data["positions"] is None and data["first_index"] is None and data["end_to_end"] is None
    assert all(cell["v"] == 0 for row in data["heatmap"]["cells"] for cell in row if cell)


def test_html_page_data_matches_the_report(report):
    from parity.report.html import page_data

    data = page_data(report)
    by_kind = {(kind, layer["layer"]): value for layer in report["layers"] for kind, value in layer["by_kind"].items()}
    drawn = {(s["kind"], p["layer"]): p["rel_l2"] for s in data["depth"] for p in s["points"]}
    assert drawn == by_kind
    steps = sorted({p["step"] for p in report["pairs"]})
    assert data["heatmap"]["steps"] == steps
    columns = data["heatmap"]["columns"]
    assert columns[0] == "model.embed_tokens" and columns[-2:] == ["model.norm", "lm_head"]
    assert columns[1:-2] == [str(layer["layer"]) for layer in report["layers"]]
    for si, step in enumerate(steps):
        for ci, layer in enumerate(report["layers"], start=1):
            values = [p["metrics"]["rel_l2"] for p in report["pairs"]
                      if p["step"] == step and p["layer"] == layer["layer"]]
            assert data["heatmap"]["cells"][si][ci]["v"] == max(values)
    positions = report["first_divergence"]["positions"]
    assert data["positions"]["labels"] == positions["tokens"] and data["positions"]["decoded"]
    assert len(data["pairs"]) == len(report["pairs"])


def test_writers_report_io_errors_as_usage_errors(report, tmp_path):
    from parity.report.html import write_html
    from parity.report.junit import write_junit
    from parity.report.markdown import write_markdown

    blocker = tmp_path / "file"
    blocker.write_text("x")
    for writer in (write_html, write_junit, write_markdown):
        with pytest.raises(UsageError, match="cannot write"):
            writer(report, blocker / "out")
        with pytest.raises(UsageError, match="cannot write"):
            writer(report, tmp_path)  # a directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# -------------------------------------------------------------------------------- parity report

@pytest.fixture()
def report_file(report, tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report), encoding="utf-8")
    return path


def test_report_command_renders_every_format_and_exits_with_the_verdict(report, report_file, tmp_path):
    from click.testing import CliRunner

    from parity.commands.report_cmd import report_cmd

    out = tmp_path / "o"
    result = CliRunner().invoke(report_cmd, [str(report_file), "--html", str(out / "r.html"),
                                             "--junit", str(out / "j.xml"), "--markdown", str(out / "s.md")],
                                standalone_mode=False)
    assert result.exception is None, result.output
    assert result.return_value == 1  # the report's verdict is fail
    first = report["first_divergence"]
    assert result.stdout.splitlines() == [
        f"FAIL: {report['summary']['passed']} of {report['summary']['pairs']} pairs passed; "
        f"{report['summary']['failed']} failed (fail {report['summary']['outcomes']['fail']})",
        f"first divergence: {first['name']} (step {first['step']}, layer {first['layer']})"]
    assert "wrote HTML report" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["j.xml", "r.html", "s.md"]
    ET.parse(out / "j.xml")


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: "not json {", "is not valid JSON"),
    (lambda d: [1, 2], "the document must be an object"),
    (lambda d: {**d, "schema_version": 3}, "schema_version is 3; this parity reads version 2"),
    (lambda d: {k: v for k, v in d.items() if k != "pairs"}, "report lacks the key 'pairs'"),
    (lambda d: {**d, "pairs": d["pairs"][:-1]}, "summary.pairs is 92 but the report lists 91 pairs"),
    (lambda d: {**d, "pairs": [*d["pairs"][:3], {**d["pairs"][3], "step": "0"}, *d["pairs"][4:]]},
     "pairs[3].step must be an int, got a string"),
    (lambda d: {**d, "pairs": [{**d["pairs"][0], "outcome": "meh"}, *d["pairs"][1:]]},
     "pairs[0].outcome 'meh' is not one of identical, pass, noise, anomalous, fail"),
    (lambda d: {**d, "end_to_end": {"prompts": [{"prompt": "p", "baseline_tokens": [1], "target_tokens": []}]}},
     "end_to_end.prompts[0].baseline_tokens[0] must be a string, got a number"),
])
def test_report_command_validates_the_json(report, tmp_path, mutate, needle):
    from parity.commands.report_cmd import report_cmd

    data = mutate(copy.deepcopy(report))
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    with pytest.raises(UsageError) as info:
        report_cmd.main([str(path), "--html", str(tmp_path / "r.html")], standalone_mode=False)
    assert needle in info.value.one_line() and "\n" not in info.value.one_line()
    assert not (tmp_path / "r.html").exists()


def test_report_command_needs_an_output_and_never_overwrites_its_input(report_file, tmp_path):
    from parity.commands.report_cmd import report_cmd

    def error(*args: str) -> str:
        with pytest.raises(UsageError) as info:
            report_cmd.main(list(args), standalone_mode=False)
        return info.value.one_line()

    assert error(str(report_file)) == ("nothing to write (give at least one of --html PATH, --junit PATH, "
                                       "--markdown PATH)")
    assert "is the input report" in error(str(report_file), "--html", str(report_file))
    assert "same file" in error(str(report_file), "--html", str(tmp_path / "x"), "--junit", str(tmp_path / "x"))
    assert "cannot read report" in error(str(tmp_path / "missing.json"), "--html", str(tmp_path / "r.html"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_parity_report_subprocess_through_the_cli(report_file, tmp_path):
    """`parity report` renders a saved JSON report through the real CLI."""
    env = {**os.environ, "COLUMNS": "160"}
    ok = subprocess.run([*PARITY, "report", str(report_file), "--markdown", str(tmp_path / "s.md")],
                        capture_output=True, text=True, timeout=60, env=env)
    assert ok.returncode == 1 and ok.stdout.startswith("FAIL: ") and (tmp_path / "s.md").is_file()
    bad = subprocess.run([*PARITY, "report", str(report_file)], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nothing to write" in bad.stderr
    assert "Traceback" not in bad.stderr
