"""`parity watch` as a running process: real dumps, real HTTP scrapes, real signals.

Every wait is bounded; the server only ever binds 127.0.0.1 on a free port (--port 0).
"""

from __future__ import annotations

import json
import math
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from parity.errors import DumpError, UsageError

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "examples" / "prometheus-alerts.yml"
# Until parity.cli registers the command, run it the same way through its click object.
RUNNER = ("import sys\nfrom parity.commands.watch_cmd import watch_cmd\n"
          "watch_cmd.main(args=sys.argv[1:], prog_name='parity watch', standalone_mode=True)\n")


def _argv(*args: str) -> list[str]:
    import parity.cli

    if "watch" in parity.cli.cli.commands:
        return [sys.executable, "-m", "parity.cli", "watch", *args]
    return [sys.executable, "-c", RUNNER, *args]


class Watch:
    """A `parity watch` subprocess with its output lines collected by reader threads."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(_argv("--host", "127.0.0.1", "--port", "0", *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        self.out: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=self._read, args=(stream, sink), daemon=True).start()

    def _read(self, stream, sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))
            if sink is self.stdout:
                self.out.put(line)

    def port(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.out.get(timeout=0.2)
            except queue.Empty:
                assert self.proc.poll() is None, f"watch exited early: {self.stderr}"
                continue
            found = re.search(r"serving metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
            if found:
                return int(found.group(1))
        raise AssertionError(f"no 'serving metrics' line within {timeout}s: {self.stdout} {self.stderr}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=5)


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of /metrics, parsed with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def read_textfile(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(path.read_text()) for s in family.samples}


def wait_for(condition, what: str, timeout: float = 30, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _logits_reference(base_dir: Path, target_dir: Path) -> tuple[float, float, int]:
    """KL(baseline||target) and argmax agreement of the lm_head records, computed with torch."""
    import torch

    from parity.store.reader import load_run

    base, target = load_run(base_dir), load_run(target_dir)
    by_key = {(r.name, r.step): r for r in target.records}
    kls, agree = [], []
    for record in base.records:
        if record.name != "lm_head":
            continue
        b = torch.from_numpy(base.array(record)).reshape(-1, record.shape[-1])
        t = torch.from_numpy(target.array(by_key[(record.name, record.step)])).reshape(-1, record.shape[-1])
        log_b, log_t = torch.log_softmax(b, -1), torch.log_softmax(t, -1)
        kls += torch.nn.functional.kl_div(log_t, log_b, log_target=True, reduction="none").sum(-1).tolist()
        agree += (b.argmax(-1) == t.argmax(-1)).tolist()
    return sum(kls) / len(kls), sum(agree) / len(agree), len(kls)


def test_ingest_mode_serves_metrics_matching_the_json_report_and_stops_on_sigterm(baseline_dump, bf16_dump,
                                                                                    tmp_path):
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    shutil.copytree(bf16_dump, ingest / "before-start")     # present at start: skipped
    shutil.copytree(bf16_dump, ingest / ".in-progress")     # dot names: ignored (capture, then rename)
    report_path = tmp_path / "latest.json"
    watch = Watch("--baseline-dump", str(baseline_dump), "--ingest", str(ingest), "--interval", "0.2",
                  "--json", str(report_path), "--atol", "0.01")  # the bare absolute floor: bf16 rounding fails it
    try:
        port = watch.port()
        before = scrape(port)
        assert before[("parity_comparisons_total", ())] == 0
        assert not any(name == "parity_rel_l2" for name, _ in before)

        shutil.copytree(bf16_dump, ingest / "bf16-run")         # a new dump appears while watching
        metrics = wait_for(lambda: (m := scrape(port)).get(("parity_comparisons_total", ())) == 1 and m,
                           "the first comparison")
        report = wait_for(lambda: report_path.is_file() and json.loads(report_path.read_text()), "--json")
        time.sleep(1.5)  # long enough for a (wrong) second comparison of the skipped/ignored dumps
        assert scrape(port)[("parity_comparisons_total", ())] == 1
    finally:
        code = watch.stop(signal.SIGTERM)
    assert code == 0, watch.stderr
    assert watch.stderr[-1].startswith("parity watch: stopped on SIGTERM: 1 compared, 1 failed, 0 error(s)")
    assert watch.stderr[-1].endswith("metrics server closed")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    assert report["target"]["path"] == str(ingest / "bf16-run")
    worst: dict[str, dict[str, float]] = {}
    for pair in report["pairs"]:
        m = pair["metrics"]
        w = worst.setdefault(pair["name"], {"rel_l2": 0.0, "cosine": 1.0, "max_abs": 0.0})
        w["rel_l2"], w["max_abs"] = max(w["rel_l2"], m["rel_l2"]), max(w["max_abs"], m["max_abs"])
        w["cosine"] = min(w["cosine"], m["cosine"])
    for name, w in worst.items():
        for metric in ("rel_l2", "cosine", "max_abs"):
            assert metrics[(f"parity_{metric}", (("tap", name),))] == pytest.approx(w[metric], rel=1e-12, abs=0)
    assert metrics[("parity_rel_l2", (("tap", "model.layers.0.mlp"),))] == pytest.approx(
        max(p["metrics"]["rel_l2"] for p in report["pairs"] if p["name"] == "model.layers.0.mlp"), rel=1e-12)
    first = report["first_divergence"]
    assert metrics[("parity_verdict", ())] == 0 and report["summary"]["verdict"] == "fail"
    assert metrics[("parity_first_divergent_layer", ())] == first["layer"]
    assert metrics[("parity_first_divergence_info", (("outcome", first["outcome"]), ("step", str(first["step"])),
                                                      ("tap", first["name"])))] == 1
    for outcome, count in report["summary"]["outcomes"].items():
        assert metrics[("parity_pairs", (("outcome", outcome),))] == count
    assert metrics[("parity_failures_total", ())] == 1 and metrics[("parity_errors_total", ())] == 0
    for side in ("baseline", "target"):
        for kind in ("nan", "inf"):
            assert metrics[("parity_nonfinite_elements", (("kind", kind), ("side", side)))] == 0
    kl, top1, positions = _logits_reference(baseline_dump, bf16_dump)
    assert metrics[("parity_logits_kl_divergence", ())] == pytest.approx(kl, rel=1e-9) and kl > 0
    assert metrics[("parity_token_match_rate", ())] == pytest.approx(top1, rel=1e-12)
    assert metrics[("parity_logits_positions", ())] == positions
    assert abs(metrics[("parity_last_comparison_timestamp_seconds", ())] - time.time()) < 120

    # every metric the shipped alert rules use is one the watcher exports
    used = set(re.findall(r"\b(parity_[a-z0-9_]+)", ALERTS.read_text()))
    exported = {name for name, _ in metrics}
    assert used and used <= exported, used - exported


def test_ingest_mode_counts_unreadable_and_corrupted_dumps_as_errors_survives_bad_clients_and_stops_on_sigint(baseline_dump, tmp_path):
    ingest = tmp_path / "ingest"
    ingest.mkdir()
    watch = Watch("--baseline-dump", str(baseline_dump), "--ingest", str(ingest), "--interval", "0.2")
    try:
        port = watch.port()
        broken = ingest / "broken"
        broken.mkdir()
        (broken / "manifest-rank0.jsonl").write_text('{"type": "record"}\n')
        wait_for(lambda: scrape(port).get(("parity_errors_total", ())) == 1, "the error to be counted")
        assert scrape(port)[("parity_comparisons_total", ())] == 0
        # clients that send garbage, or connect and say nothing, do not stop the server
        idle = socket.create_connection(("127.0.0.1", port), timeout=5)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as rude:
            rude.sendall(b"\x00\xff NOT HTTP\r\n\r\n" * 100)
        # a dump whose tensor bytes were corrupted after capture (one flipped bit) is an error, not a pass
        flipped = tmp_path / "flipped"
        shutil.copytree(baseline_dump, flipped)
        shard = sorted((flipped / "data" / "rank0").glob("*.safetensors"))[0]
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0x01
        shard.write_bytes(bytes(data))
        shutil.move(flipped, ingest / "flipped")
        wait_for(lambda: scrape(port).get(("parity_errors_total", ())) == 2, "the corrupted dump to be counted")
        assert scrape(port)[("parity_comparisons_total", ())] == 0
        idle.close()
    finally:
        code = watch.stop(signal.SIGINT)
    assert code == 0, watch.stderr
    assert any("cannot compare" in line and "broken" in line for line in watch.stderr)
    assert any("checksum" in line and "flipped" in line for line in watch.stderr), watch.stderr
    assert watch.stderr[-1].startswith("parity watch: stopped on SIGINT: 0 compared, 0 failed, 2 error(s)")


def _model_mode_checks(metrics: dict, report: dict, identical: bool) -> None:
    assert metrics[("parity_comparisons_total", ())] == 1
    assert len({p["step"] for p in report["pairs"]}) == 2  # --sample 2: two prompts, one step each
    kl = metrics[("parity_logits_kl_divergence", ())]
    if identical:
        assert 0 <= kl < 1e-9 and metrics[("parity_token_match_rate", ())] == 1.0
        assert metrics[("parity_verdict", ())] == 1 and metrics[("parity_first_divergent_layer", ())] == -1
        assert report["first_divergence"] is None
    else:
        assert kl > 1e-7 and math.isfinite(kl)
        assert 0.5 <= metrics[("parity_token_match_rate", ())] <= 1.0
        assert metrics[("parity_verdict", ())] == 0 and report["summary"]["verdict"] == "fail"
        assert report["first_divergence"]["positions"]["tokens"]  # labelled with the model's tokenizer


def test_model_mode_one_iteration_fp32_vs_bf16_has_positive_logits_kl(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    textfile, report_path = tmp_path / "parity.prom", tmp_path / "r.json"
    watch = Watch("--baseline", "dtype=float32,attn=eager", "--target", "dtype=bfloat16,attn=sdpa", "--sample", "2",
                  "--atol", "0.01", "--iterations", "1", "--interval", "0.1", "--textfile", str(textfile), "--json", str(report_path),
                  env={"TMPDIR": str(scratch)})
    try:
        watch.port()
        code = watch.proc.wait(timeout=90)
    finally:
        watch.stop()
    assert code == 0, watch.stderr
    assert watch.stderr[-1].startswith("parity watch: stopped after 1 comparison(s): 1 compared, 1 failed")
    assert list(scratch.iterdir()) == []  # the temporary dumps are gone
    _model_mode_checks(read_textfile(textfile), json.loads(report_path.read_text()), identical=False)


def test_model_mode_identical_specs_have_zero_logits_kl(tmp_path, capsys):
    """In-process (the process-level behaviour is covered above): same spec on both sides."""
    from parity.commands.watch_cmd import watch_cmd

    textfile, report_path = tmp_path / "parity.prom", tmp_path / "r.json"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    code = watch_cmd.main(["--host", "127.0.0.1", "--port", "0", "--baseline", "dtype=float32,attn=eager",
                           "--target", "dtype=fp32", "--sample", "2", "--iterations", "1", "--interval", "0.1",
                           "--textfile", str(textfile), "--json", str(report_path)], standalone_mode=False)
    assert code == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored
    assert "1 compared, 0 failed" in capsys.readouterr().err
    _model_mode_checks(read_textfile(textfile), json.loads(report_path.read_text()), identical=True)


def test_start_up_errors_are_one_line_usage_or_dump_errors(baseline_dump, tmp_path):
    from parity.commands.watch_cmd import watch_cmd

    def error(*args: str) -> str:
        with pytest.raises((UsageError, DumpError)) as info:
            watch_cmd.main(list(args), standalone_mode=False)
        return info.value.one_line()

    ingest = tmp_path / "ingest"
    ingest.mkdir()
    assert "needs both --baseline-dump DIR and --ingest DIR" in error("--ingest", str(ingest))
    assert "--model, --sample apply to model mode only" in error(
        "--baseline-dump", str(baseline_dump), "--ingest", str(ingest), "--model", "x", "--sample", "2")
    assert "--include-existing applies to ingest mode only" in error("--include-existing")
    assert "does not exist" in error("--baseline-dump", str(baseline_dump), "--ingest", str(tmp_path / "nope"))
    assert "is not a parity dump" in error("--baseline-dump", str(ingest), "--ingest", str(ingest))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        message = error("--baseline-dump", str(baseline_dump), "--ingest", str(ingest), "--host", "127.0.0.1",
                        "--port", str(busy.getsockname()[1]))
    assert message.startswith("cannot serve metrics on 127.0.0.1:") and "--port" in message


def test_alert_rules_pass_promtool_when_installed():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus); rule names are checked against a "
                    "live scrape in the ingest test")
    result = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "SUCCESS: 7 rules found" in result.stdout, result.stdout + result.stderr
