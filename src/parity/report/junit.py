"""The JUnit XML report: one test case per pair, for CI test-result viewers.

Layout of :func:`write_junit` (the JSON report dict from ``Report.to_json()`` as input)::

    <testsuites name="parity" tests= failures= errors="0" skipped= time="0">
      <testsuite name="parity: BASELINE_SPEC vs TARGET_SPEC" tests= failures= errors="0" skipped=
                 time="0" timestamp=(target capture time)>
        <properties> verdict, baseline, target, rule, first_divergence </properties>
        <testcase classname="TAP_KIND / layer L" name="NAME @ step S" time="0">   (one per pair)
          <failure type=OUTCOME message=REASON> metrics, tolerance and its source, needed tolerance </failure>
          or <skipped message="allowed: ..."/>  for a non-pass outcome excused by an allow pattern
        </testcase>

``classname`` is the tap kind (the record name with its layer index replaced by ``{i}``) followed
by `` / layer L``; taps outside the layer stack use their name alone. ``name`` is the record name
and step (`` rank R`` is added in multi-rank runs). Counts: ``tests`` = pairs, ``failures`` =
pairs neither passing nor allowed (``summary.failed``), ``skipped`` = allowed pairs. Characters
XML 1.0 cannot carry (control characters in record names) are written as ``\\xNN``. The file is
written atomically (temp file + ``os.replace``); I/O errors raise :class:`parity.errors.UsageError`.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from typing import Any

from parity.compare.verdict import outcome_ok
from parity.report.files import write_text_atomic

_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

#: Metrics listed in a failure's body, in this order.
METRIC_KEYS = ("numel", "mismatched", "mismatch_fraction", "max_abs", "max_abs_index", "baseline_at_max",
               "target_at_max", "mean_abs", "max_rel", "rel_l2", "cosine", "sqnr_db", "nan_baseline",
               "nan_target", "inf_baseline", "inf_target")


def _clean(text: Any) -> str:
    """``text`` as a string XML 1.0 can hold (forbidden characters as ``\\xNN``)."""
    return _INVALID_XML.sub(lambda m: f"\\x{ord(m.group(0)):02x}" if ord(m.group(0)) < 0x100
                            else f"\\u{ord(m.group(0)):04x}", str(text))


def _spec_text(run: dict[str, Any]) -> str:
    spec = run.get("spec") or {}
    if not isinstance(spec, dict) or not spec:
        return str(run.get("path", "?"))
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in spec.items())


def _g_up(x: Any) -> str:
    """A needed tolerance rounded up to 3 significant digits (a copied value still passes)."""
    from parity.report.terminal import g_up

    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return g_up(float(x))
    return str(x)


def _kind(name: str) -> str:
    from parity.capturing.taps import tap_kind

    return tap_kind(name)


def classname(pair: dict[str, Any]) -> str:
    """``TAP_KIND / layer L`` (or the name alone for taps outside the layer stack)."""
    layer = pair.get("layer")
    if layer is None:
        return pair["name"]
    return f"{_kind(pair['name'])} / layer {layer}"


def case_name(pair: dict[str, Any], multi_rank: bool) -> str:
    """``NAME @ step S`` (with `` rank R`` when the run has several ranks)."""
    return f"{pair['name']} @ step {pair['step']}" + (f" rank {pair['rank']}" if multi_rank else "")


def failure_text(pair: dict[str, Any]) -> str:
    """The body of a failure: reason, shapes, metrics, tolerance with its source, needed tolerance."""
    lines = [f"outcome: {pair['outcome']}", f"reason: {pair.get('reason', '')}"]
    for side in ("baseline", "target"):
        info = pair.get(side)
        lines.append(f"{side}: " + (f"{info.get('dtype')}{info.get('shape')}" if info else "missing"))
    tol = pair.get("tolerance")
    if tol:
        lines.append(f"tolerance: rtol={tol.get('rtol')} atol={tol.get('atol')} ({tol.get('source')})")
    needed = pair.get("needed")
    if needed:
        lines.append(f"would pass with: atol>={_g_up(needed.get('atol'))} at this rtol, "
                     f"or rtol>={_g_up(needed.get('rtol'))} at this atol")
    metrics = pair.get("metrics")
    if metrics:
        lines.append("metrics: " + ", ".join(f"{k}={metrics[k]}" for k in METRIC_KEYS if k in metrics))
    for note in pair.get("notes") or []:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def build_junit(data: dict[str, Any]) -> ET.Element:
    """The ``<testsuites>`` element for a JSON report dict."""
    summary = data["summary"]
    pairs = data.get("pairs", [])
    multi_rank = len({p.get("rank") for p in pairs}) > 1
    failures = sum(1 for p in pairs if not outcome_ok(p["outcome"], p.get("allowed")))
    skipped = sum(1 for p in pairs if not outcome_ok(p["outcome"]) and p.get("allowed"))
    counts = {"tests": str(len(pairs)), "failures": str(failures), "errors": "0", "skipped": str(skipped),
              "time": "0"}
    base, target = data.get("baseline") or {}, data.get("target") or {}
    root = ET.Element("testsuites", {"name": "parity", **counts})
    suite = ET.SubElement(root, "testsuite", {
        "name": _clean(f"parity: {_spec_text(base)} vs {_spec_text(target)}"), **counts,
        "timestamp": _clean(target.get("created") or base.get("created") or "")})
    props = ET.SubElement(suite, "properties")
    first = data.get("first_divergence")
    for key, value in (("verdict", summary["verdict"]), ("baseline", base.get("path", "")),
                       ("target", target.get("path", "")), ("rule", (data.get("tolerance") or {}).get("rule", "")),
                       ("first_divergence", f"{first['name']} @ step {first['step']}" if first else "none")):
        ET.SubElement(props, "property", {"name": key, "value": _clean(value)})
    for pair in pairs:
        case = ET.SubElement(suite, "testcase", {"classname": _clean(classname(pair)),
                                                 "name": _clean(case_name(pair, multi_rank)), "time": "0"})
        if outcome_ok(pair["outcome"]):
            continue
        if pair.get("allowed"):
            ET.SubElement(case, "skipped", {"message": _clean(f"allowed {pair['outcome']}: {pair.get('reason', '')}")})
            continue
        failure = ET.SubElement(case, "failure", {"type": pair["outcome"],
                                                  "message": _clean(f"{pair['outcome']}: {pair.get('reason', '')}")})
        failure.text = _clean(failure_text(pair))
    return root


def render_junit(data: dict[str, Any]) -> str:
    """The JUnit XML document as text (UTF-8, with an XML declaration)."""
    root = build_junit(data)
    ET.indent(root, space=" ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(data: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the JUnit XML report of ``data`` (a JSON report dict) to ``path``, atomically."""
    write_text_atomic(path, render_junit(data), "JUnit report")
