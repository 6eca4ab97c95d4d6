"""``parity watch``: compare periodically and serve the results as Prometheus metrics.

Two sources of comparisons (:class:`IngestSource`, :class:`ModelSource`):

- ingest: every new dump directory appearing in an ingest directory (a direct subdirectory
  holding a ``manifest-rank*.jsonl``; names starting with ``.`` are ignored, so writers can
  capture into ``.name`` and rename when done) is compared against a baseline dump. A directory
  is taken once its files (names, sizes, mtimes) stayed the same for :data:`SETTLE_SECONDS`
  (default 1 s). Dumps present at start are skipped unless ``include_existing``. A directory that
  cannot be compared is reported and retried only when its files change.
- model: both backends are loaded once; each interval a sample of the prompts (round robin
  through the prompt list, :data:`DEFAULT_SAMPLE` = 4 per interval by default) is captured on
  both into a temporary directory, compared, and the dumps deleted. Identical specs share one
  loaded model.

:class:`WatchMetrics` is a ``prometheus_client`` collector exposing the latest comparison (one
immutable :class:`Snapshot`, swapped atomically, so a scrape never sees half an update) and
counters; every metric is documented in docs/reports.md. Logits agreement
(:func:`logits_agreement`) compares the logits records (name ``lm_head``, ``logits`` or ending in
``.lm_head``) of both runs: KL(baseline‖target) of the softmax distributions in float64 averaged
over positions, and the top-1 (argmax) agreement rate — for teacher-forced positions, since both
runs read the same prompt tokens. :func:`run` serves ``/metrics`` (``start_http_server`` on a
private ``CollectorRegistry``), loops until ``iterations`` comparisons were attempted (0 =
forever) or SIGINT/SIGTERM, then shuts the server down.

Defaults: host :data:`DEFAULT_HOST` (127.0.0.1), port :data:`DEFAULT_PORT` (9464; 0 picks a free
one), interval :data:`DEFAULT_INTERVAL` (30 s, measured from the start of one comparison to the
next in model mode, between directory polls in ingest mode), logits processed in row chunks of at
most :data:`LOGIT_CHUNK_ELEMENTS` (1 Mi elements) so memory does not grow with the vocabulary.
"""

from __future__ import annotations

import math
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from parity.errors import ParityError, UsageError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464
DEFAULT_INTERVAL = 30.0
DEFAULT_SAMPLE = 4
#: A new ingest directory is taken once it did not change for this long (seconds).
SETTLE_SECONDS = 1.0
#: Logit rows processed at once are bounded by this many elements (default 1 Mi, 8 MB float64).
LOGIT_CHUNK_ELEMENTS = 1 << 20

Echo = Callable[[str], None]


@dataclass
class CompareSettings:
    """How each comparison is made: the tolerance policy, renames and allow patterns."""

    policy: Any = None
    renames: Sequence[Any] = ()
    allow_missing: Sequence[str] = ()
    allow_failed: Sequence[str] = ()


@dataclass(frozen=True)
class LogitsAgreement:
    """Agreement of the next-token distributions of two runs over all ``lm_head`` positions."""

    kl: float
    top1: float
    positions: int


@dataclass(frozen=True)
class TapError:
    """Worst error of one record name over steps and ranks."""

    rel_l2: float
    cosine: float
    max_abs: float


@dataclass(frozen=True)
class Snapshot:
    """Everything the metrics say about the latest comparison."""

    label: str
    baseline: str
    verdict: str
    taps: dict[str, TapError]
    outcomes: dict[str, int]
    first_layer: int
    first: tuple[str, int, str] | None
    logits: LogitsAgreement | None
    nonfinite: dict[tuple[str, str], int]
    timestamp: float
    duration: float


def _is_logits(name: str) -> bool:
    """Logits records: ``lm_head`` (transformers), ``logits`` (canonical taps), or ``*.lm_head``."""
    return name in ("lm_head", "logits") or name.endswith(".lm_head")


def logits_agreement(base: Any, target: Any, renames: Sequence[Any] = ()) -> LogitsAgreement | None:
    """KL(baseline‖target) and top-1 agreement over every position of the paired ``lm_head``
    records of two loaded runs (None when there is none). Softmax in float64, in row chunks."""
    import numpy as np

    from parity.compare.pairing import pair_records
    from parity.store.format import FLOAT_DTYPES
    from parity.store.safetensors_io import to_float

    kl_sum, agree, positions = 0.0, 0, 0
    for pair in pair_records(base.records, target.records, renames):
        b, t = pair.baseline, pair.target
        if not _is_logits(pair.name) or b is None or t is None or b.shape != t.shape or not b.shape:
            continue
        if b.dtype not in FLOAT_DTYPES or t.dtype not in FLOAT_DTYPES or b.shape[-1] < 1:
            continue
        vocab = b.shape[-1]
        rows_b, rows_t = base.raw(b).reshape(-1, vocab), target.raw(t).reshape(-1, vocab)
        step = max(1, LOGIT_CHUNK_ELEMENTS // vocab)
        for start in range(0, rows_b.shape[0], step):
            lb = to_float(rows_b[start:start + step], b.dtype)
            lt = to_float(rows_t[start:start + step], t.dtype)
            with np.errstate(all="ignore"):
                log_pb = lb - lb.max(axis=1, keepdims=True)
                log_pb -= np.log(np.exp(log_pb).sum(axis=1, keepdims=True))
                log_pt = lt - lt.max(axis=1, keepdims=True)
                log_pt -= np.log(np.exp(log_pt).sum(axis=1, keepdims=True))
                pb = np.exp(log_pb)
                terms = np.where(pb > 0, pb * (log_pb - log_pt), 0.0)
            kl_sum += float(terms.sum())
            agree += int((lb.argmax(axis=1) == lt.argmax(axis=1)).sum())
            positions += lb.shape[0]
        base.release(b)
        target.release(t)
    if positions == 0:
        return None
    return LogitsAgreement(kl=kl_sum / positions, top1=agree / positions, positions=positions)


def _worst(a: float, b: float, high: bool = True) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b) if high else min(a, b)


def tap_errors(outcomes: Sequence[Any]) -> dict[str, TapError]:
    """Per record name: worst rel L2, lowest cosine, largest max |Δ| over its pairs with metrics."""
    taps: dict[str, TapError] = {}
    for o in outcomes:
        m = o.metrics
        if m is None:
            continue
        old = taps.get(o.name)
        taps[o.name] = TapError(m.rel_l2, m.cosine, m.max_abs) if old is None else TapError(
            _worst(old.rel_l2, m.rel_l2), _worst(old.cosine, m.cosine, high=False), _worst(old.max_abs, m.max_abs))
    return taps


def nonfinite_counts(base: Any, target: Any) -> dict[tuple[str, str], int]:
    """NaN and Inf element counts per side, from every record's capture statistics."""
    counts = {}
    for side, run in (("baseline", base), ("target", target)):
        for kind in ("nan", "inf"):
            counts[(side, kind)] = sum(int(r.stats.get(kind) or 0) for r in run.records)
    return counts


def compare_dumps(base_dir: Path, target_dir: Path, settings: CompareSettings, *, label: str,
                  decode: Callable[[int], str] | None = None) -> tuple[Any, Snapshot]:
    """Compare two dump directories; return the :class:`~parity.compare.result.Report` and the
    metrics :class:`Snapshot` of it."""
    from parity.compare.engine import compare
    from parity.store.reader import load_run

    started = time.monotonic()
    base_run, target_run = load_run(base_dir), load_run(target_dir)
    try:
        logits = logits_agreement(base_run, target_run, settings.renames)
    finally:
        base_run.close()
        target_run.close()
    nonfinite = nonfinite_counts(base_run, target_run)
    report = compare(base_run, target_run, policy=settings.policy, renames=settings.renames,
                     allow_missing=settings.allow_missing, allow_failed=settings.allow_failed, decode=decode)
    first = report.first_divergence
    counts = report.counts()
    snapshot = Snapshot(
        label=label, baseline=str(base_dir), verdict=report.verdict, taps=tap_errors(report.outcomes),
        outcomes=dict(counts),
        first_layer=first.layer if first is not None and first.layer is not None else -1,
        first=(first.name, first.step, first.kind) if first is not None else None,
        logits=logits, nonfinite=nonfinite, timestamp=time.time(), duration=time.monotonic() - started)
    return report, snapshot


class WatchMetrics:
    """A ``prometheus_client`` collector of the latest :class:`Snapshot` and the counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.snapshot: Snapshot | None = None
        self.comparisons = 0
        self.failures = 0
        self.errors = 0

    def record(self, snapshot: Snapshot) -> None:
        """Publish a comparison: swap the snapshot and count it (atomically for scrapes)."""
        with self._lock:
            self.snapshot = snapshot
            self.comparisons += 1
            self.failures += snapshot.verdict == "fail"

    def record_error(self) -> None:
        """Count a comparison that could not be made."""
        with self._lock:
            self.errors += 1

    def collect(self) -> Iterator[Any]:
        """Metric families for a scrape (called by the registry)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

        with self._lock:
            snap, comparisons, failures, errors = self.snapshot, self.comparisons, self.failures, self.errors
        yield CounterMetricFamily("parity_comparisons", "Comparisons completed since start.", value=comparisons)
        yield CounterMetricFamily("parity_failures", "Comparisons whose verdict was fail.", value=failures)
        yield CounterMetricFamily("parity_errors", "Comparisons that could not be made (unreadable dump, "
                                  "capture error).", value=errors)
        if snap is None:
            return
        per_tap = (("parity_rel_l2", "Relative L2 error ||t-b||/||b|| per tap, worst over steps.", "rel_l2"),
                   ("parity_cosine", "Cosine similarity of target and baseline per tap, lowest over steps.",
                    "cosine"),
                   ("parity_max_abs", "Max absolute error |t-b| per tap, largest over steps.", "max_abs"))
        for name, doc, attr in per_tap:
            family = GaugeMetricFamily(name, doc, labels=["tap"])
            for tap, err in snap.taps.items():
                family.add_metric([tap], getattr(err, attr))
            yield family
        yield GaugeMetricFamily("parity_verdict", "Verdict of the last comparison: 1 pass, 0 fail.",
                                value=1.0 if snap.verdict == "pass" else 0.0)
        yield GaugeMetricFamily("parity_first_divergent_layer", "Layer index of the first divergence; -1 "
                                "when there is none or the first divergent tap has no layer index.",
                                value=snap.first_layer)
        if snap.first is not None:
            info = InfoMetricFamily("parity_first_divergence", "The first divergent pair of the last comparison.")
            info.add_metric([], {"tap": snap.first[0], "step": str(snap.first[1]), "outcome": snap.first[2]})
            yield info
        pairs = GaugeMetricFamily("parity_pairs", "Pairs of the last comparison by outcome.", labels=["outcome"])
        for outcome, count in snap.outcomes.items():
            if outcome != "allowed":
                pairs.add_metric([outcome], count)
        yield pairs
        yield GaugeMetricFamily("parity_allowed_pairs", "Non-pass pairs of the last comparison excused by "
                                "--allow-missing / --allow-failed.", value=snap.outcomes.get("allowed", 0))
        nonfinite = GaugeMetricFamily("parity_nonfinite_elements", "NaN / Inf elements over every record of "
                                      "each side of the last comparison.", labels=["side", "kind"])
        for (side, kind), count in snap.nonfinite.items():
            nonfinite.add_metric([side, kind], count)
        yield nonfinite
        if snap.logits is not None:
            yield GaugeMetricFamily("parity_logits_kl_divergence", "KL(baseline||target) of the lm_head "
                                    "softmax distributions, nats, averaged over positions.", value=snap.logits.kl)
            yield GaugeMetricFamily("parity_token_match_rate", "Fraction of teacher-forced positions where "
                                    "both runs' lm_head argmax agree.", value=snap.logits.top1)
            yield GaugeMetricFamily("parity_logits_positions", "Positions the logits metrics averaged over.",
                                    value=snap.logits.positions)
        yield GaugeMetricFamily("parity_last_comparison_timestamp_seconds", "Unix time the last comparison "
                                "finished.", value=snap.timestamp)
        yield GaugeMetricFamily("parity_comparison_duration_seconds", "Wall time of the last comparison "
                                "(loading the dumps, logits, pairs).", value=snap.duration)
        target = InfoMetricFamily("parity_last_comparison", "What the last comparison compared.")
        target.add_metric([], {"baseline": snap.baseline, "target": snap.label, "verdict": snap.verdict})
        yield target


# --------------------------------------------------------------------------------------------
# sources of comparisons


class IngestSource:
    """New dump directories in ``root``, each compared against ``baseline``."""

    def __init__(self, baseline: Path, root: Path, *, include_existing: bool = False,
                 settle: float = SETTLE_SECONDS) -> None:
        self.baseline, self.root, self.settle = baseline, root, settle
        self.pending: dict[str, tuple[tuple, float]] = {}
        self.done: dict[str, tuple] = {}
        if not include_existing:
            for path in self._candidates():
                self.done[path.name] = self._signature(path)

    def describe(self) -> str:
        """One line for the start-up message."""
        skipped = f"; {len(self.done)} existing dump(s) skipped" if self.done else ""
        return f"watching {self.root} for new dumps, compared against {self.baseline}{skipped}"

    def _candidates(self) -> list[Path]:
        from parity.store.format import MANIFEST_GLOB

        try:
            entries = list(self.root.iterdir())
        except OSError as exc:
            raise UsageError(f"cannot list ingest directory {self.root}: {exc.strerror or exc}") from None
        base = self.baseline.resolve()
        found = []
        for path in entries:
            try:
                if (not path.name.startswith(".") and path.is_dir() and path.resolve() != base
                        and any(path.glob(MANIFEST_GLOB))):
                    found.append(path)
            except OSError:
                continue
        return sorted(found, key=lambda p: (self._mtime(p), p.name))

    @staticmethod
    def _mtime(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:
            return 0.0

    @staticmethod
    def _signature(path: Path) -> tuple:
        items = []
        for file in sorted(path.rglob("*")):
            try:
                st = file.stat()
            except OSError:
                continue
            items.append((str(file.relative_to(path)), st.st_size, st.st_mtime_ns))
        return tuple(items)

    def ready(self, now: float) -> list[Path]:
        """Directories new (or changed) since they were last taken and settled."""
        out = []
        for path in self._candidates():
            sig = self._signature(path)
            if self.done.get(path.name) == sig:
                continue
            seen = self.pending.get(path.name)
            if seen is None or seen[0] != sig:
                self.pending[path.name] = (sig, now)
            elif now - seen[1] >= self.settle:
                out.append(path)
        return out

    def taken(self, path: Path) -> None:
        """Mark ``path`` handled (compared or failed) in its current state."""
        self.pending.pop(path.name, None)
        self.done[path.name] = self._signature(path)

    def waiting(self) -> bool:
        """Whether some directory is waiting to settle (poll again soon)."""
        return bool(self.pending)


class _Stopped(Exception):
    """Raised from a capture progress callback to abandon the capture when asked to stop."""


class ModelSource:
    """Both backends loaded once; each call captures a round-robin sample of prompts on both."""

    def __init__(self, model_dir: Path, baseline_spec: Any, target_spec: Any, prompts: list[str], *,
                 sample: int = DEFAULT_SAMPLE, taps: Sequence[str] | None = None) -> None:
        self.model_dir, self.specs, self.prompts = model_dir, (baseline_spec, target_spec), prompts
        self.sample = max(1, min(sample, len(prompts)))
        self.taps = list(taps) if taps else None
        self.cursor = 0
        self.models: tuple[Any, Any] | None = None

    def describe(self) -> str:
        """One line for the start-up message."""
        return (f"model {self.model_dir}: baseline {self.specs[0]} vs target {self.specs[1]}, "
                f"{self.sample} of {len(self.prompts)} prompts per comparison")

    def load(self) -> None:
        """Load both backends (one model when the specs are equal)."""
        from parity.backends.hf import load

        base = load(self.model_dir, self.specs[0])
        target = base if self.specs[1] == self.specs[0] else load(self.model_dir, self.specs[1])
        self.models = (base, target)

    def next_prompts(self) -> list[str]:
        """The next ``sample`` prompts, round robin through the prompt list."""
        chosen = [self.prompts[(self.cursor + i) % len(self.prompts)] for i in range(self.sample)]
        self.cursor = (self.cursor + self.sample) % len(self.prompts)
        return chosen

    def capture(self, work: Path, stop: threading.Event) -> tuple[Path, Path]:
        """Capture the next sample on both backends into ``work/baseline`` and ``work/target``."""
        from parity.backends.hf import run_and_capture

        assert self.models is not None, "load() first"
        prompts = self.next_prompts()

        def check(*_: Any) -> None:
            if stop.is_set():
                raise _Stopped()

        dirs = (work / "baseline", work / "target")
        for loaded, out in zip(self.models, dirs):
            check()
            run_and_capture(loaded, prompts, out, taps=self.taps, progress=check)
        return dirs

    def decode(self, token_id: int) -> str:
        """Token text through the baseline's tokenizer."""
        assert self.models is not None
        return self.models[0].tokenizer.decode([token_id])


# --------------------------------------------------------------------------------------------
# the loop


@dataclass
class WatchOptions:
    """Loop and output settings of :func:`run` (defaults as in the module docstring)."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    interval: float = DEFAULT_INTERVAL
    iterations: int = 0
    json_path: str | None = None
    textfile: str | None = None
    settings: CompareSettings = field(default_factory=CompareSettings)


def _now_text() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _summary_line(report: Any, snap: Snapshot) -> str:
    counts = report.counts()
    text = (f"{_now_text()} {snap.label}: {report.verdict.upper()} {counts['pass']} of "
            f"{len(report.outcomes)} pairs passed")
    if snap.first is not None:
        layer = "-" if snap.first_layer < 0 else snap.first_layer
        text += f"; first divergence {snap.first[0]} (step {snap.first[1]}, layer {layer})"
    if snap.logits is not None:
        text += f"; logits KL {snap.logits.kl:.3g}, top-1 match {100 * snap.logits.top1:.1f}%"
    return text


def serve(host: str, port: int, registry: Any) -> tuple[Any, threading.Thread]:
    """Start the ``/metrics`` HTTP server; :class:`UsageError` when the address cannot be bound."""
    from prometheus_client import start_http_server

    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}",
                         hint="choose another --port (0 picks a free one) or --host") from None


class Watcher:
    """Runs one source: compares, publishes metrics, writes outputs, until stopped."""

    def __init__(self, source: IngestSource | ModelSource, options: WatchOptions, echo: Echo, warn: Echo) -> None:
        self.source, self.options, self.echo, self.warn = source, options, echo, warn
        self.metrics = WatchMetrics()
        self.stop = threading.Event()
        self.signal_name: str | None = None
        self.attempts = 0

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        self.stop.set()

    def _publish(self, report: Any, snap: Snapshot) -> None:
        """Metrics first (the product of watch), then the optional files; a file that cannot be
        written is reported and does not undo the comparison."""
        from prometheus_client import write_to_textfile

        from parity.report.json_report import write_json

        self.metrics.record(snap)
        self.echo(_summary_line(report, snap))
        if self.options.json_path:
            try:
                write_json(report, self.options.json_path)
            except ParityError as exc:
                self.warn(f"parity watch: error: {exc.one_line()}")
        if self.options.textfile:
            try:
                write_to_textfile(self.options.textfile, self.registry)
            except OSError as exc:
                self.warn(f"parity watch: error: cannot write metrics file {self.options.textfile}: "
                          f"{exc.strerror or exc}")

    def _attempt(self, what: str, action: Callable[[], tuple[Any, Snapshot]]) -> None:
        self.attempts += 1
        try:
            report, snap = action()
            self._publish(report, snap)
        except _Stopped:
            self.attempts -= 1
        except (ParityError, OSError) as exc:
            self.metrics.record_error()
            message = exc.one_line() if isinstance(exc, ParityError) else f"{type(exc).__name__}: {exc}"
            self.warn(f"parity watch: error: cannot compare {what}: {message}")

    def _done(self) -> bool:
        return self.stop.is_set() or (self.options.iterations > 0 and self.attempts >= self.options.iterations)

    def _ingest_loop(self, source: IngestSource) -> None:
        settings = self.options.settings
        while not self._done():
            now = time.monotonic()
            for path in source.ready(now):
                if self._done():
                    break
                self._attempt(str(path), lambda p=path: compare_dumps(source.baseline, p, settings, label=p.name))
                source.taken(path)
            if self._done():
                break
            self.stop.wait(min(self.options.interval, source.settle) if source.waiting() else self.options.interval)

    def _model_loop(self, source: ModelSource) -> None:
        settings = self.options.settings
        self.echo(f"{_now_text()} loading {source.specs[0]} and {source.specs[1]} from {source.model_dir}")
        source.load()
        label = f"{source.specs[1]}"

        def once() -> tuple[Any, Snapshot]:
            work = Path(tempfile.mkdtemp(prefix="parity-watch-"))
            try:
                base_dir, target_dir = source.capture(work, self.stop)
                return compare_dumps(base_dir, target_dir, settings, label=label, decode=source.decode)
            finally:
                shutil.rmtree(work, ignore_errors=True)

        while not self._done():
            started = time.monotonic()
            self._attempt("the model sample", once)
            if self._done():
                break
            self.stop.wait(max(0.0, self.options.interval - (time.monotonic() - started)))

    def run(self) -> int:
        """Serve, loop, shut down; returns the exit code (0)."""
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.metrics)
        server, thread = serve(self.options.host, self.options.port, self.registry)
        previous: dict[int, Any] = {}
        try:
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    previous[sig] = signal.signal(sig, self._handle)
            host, port = server.server_address[:2]
            shown = f"[{host}]" if ":" in str(host) else host
            self.echo(f"parity watch: serving metrics on http://{shown}:{port}/metrics")
            self.echo(f"parity watch: {self.source.describe()}")
            if isinstance(self.source, IngestSource):
                self._ingest_loop(self.source)
            else:
                self._model_loop(self.source)
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        m = self.metrics
        why = f"on {self.signal_name}" if self.signal_name else f"after {self.attempts} comparison(s)"
        self.warn(f"parity watch: stopped {why}: {m.comparisons} compared, {m.failures} failed, "
                  f"{m.errors} error(s); metrics server closed")
        return 0
