"""Fuzz the dump readers with hostile mutants of a real dump; every case must be handled.

    python scripts/fuzz_dumps.py [--cases 2000] [--seed 0] [--keep DIR]

A real capture (a small torch model with float32, bfloat16, float16 and int64 outputs, two
steps) is written once in full mode and once in statistics mode. Each case copies one of them,
applies one seeded mutation — a flipped byte in tensor data or in a shard header, a truncated
shard, a hostile value in a manifest field (huge or negative shapes, steps, names, world sizes,
non-finite statistics, path tricks), a duplicated, dropped, swapped or cut manifest line, a
shard replaced by a symlink, a directory or a FIFO — and runs ``parity compare PRISTINE
MUTANT`` (with HTML, Markdown, JUnit and JSON reports), ``parity compare --salvage``, ``parity
inspect MUTANT``, ``parity inspect --verify MUTANT`` and ``parity inspect --verify --salvage
MUTANT`` in this process.

A case is **handled** when every command either exits 2 with one ``parity: error:`` line on
stderr, or exits 0/1 on a mutant whose tensor bytes are intact (a manifest value that is still
valid, such as another step number, is data the reader cannot know to be wrong). It **fails**
on an internal error (a traceback, ``internal error``, an exit code other than 0, 1, 2), on
exit 0 or 1 from ``compare`` or ``inspect --verify`` when tensor bytes were changed (a silent
pass, or corruption reported as a numerical divergence), on exit 0 from the ``--salvage``
commands then (they report corruption with exit 1), on exit 0 from ``inspect`` (without
``--verify``) when a shard's header was damaged, and on a command running longer than
:data:`CASE_SECONDS`. Prints the counts per mutation kind and every failure; exit 1 if any.
:func:`run_fuzz` is what the test suite calls with a small, fixed budget.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

#: Seconds one command may take on one mutant before the case counts as a hang.
CASE_SECONDS = 20

HOSTILE_INTS = [-1, -(2**63), 2**31, 2**40, 2**62, 2**64, 10**30, 1.5, float("nan"), "3", None, True, [], {}]
HOSTILE_SHAPES = [[2**40, 2**40], [2**39] * 16, [-1], [0], [1] * 17, [3, "4"], "[3]", [1.5], [2**63], [], [10**6] * 3]
HOSTILE_STRINGS = ["", "x" * 5000, "\x1b[31mred\x1b[0m", "[bold]markup[/bold]", "../../etc/passwd", "a\nb",
                   "\u202e", "\x00", 7, None, ["list"], "[/]", "[link=file:///etc/passwd]x[/link]", "\ud800",
                   "a</script><script>alert(1)</script>", "x|y`z", "\x07\x08\x9b"]
HOSTILE_STATS = [{"min": float("inf")}, {"l2": -1.0}, {"l2": "inf"}, {"numel": 2**62}, {"nan": -5},
                 {"sample": [1.0] * 5000}, {"sample": ["nan", "x"]}, {"mean": "1e400"}, [], "stats", None,
                 {"min": 1e308, "max": -1e308, "l2": 1e308, "mean": 1e308}]


# --------------------------------------------------------------------------- the dumps


def _capture(out: Path, mode: str) -> None:
    import torch

    import parity

    class Cast(torch.nn.Module):
        def __init__(self, dtype: torch.dtype) -> None:
            super().__init__()
            self.dtype = dtype

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.to(self.dtype)

    class ArgMax(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.float().argmax(dim=-1)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(64, 96), torch.nn.Linear(96, 128), Cast(torch.bfloat16),
                                Cast(torch.float16), Cast(torch.float32), torch.nn.Linear(128, 128), ArgMax())
    with torch.no_grad(), parity.capture(model, out, mode=mode) as session:
        model(torch.arange(24).reshape(2, 12))
        model(torch.arange(40, 56).reshape(1, 16))
    if session.error is not None:
        raise RuntimeError(f"the fuzz base dump could not be captured: {session.error}")


def base_dumps(root: Path) -> dict[str, Path]:
    """The pristine dumps: ``full`` and ``stats``."""
    dumps = {}
    for mode in ("full", "stats"):
        dumps[mode] = root / f"base-{mode}"
        if not (dumps[mode] / "manifest-rank0.jsonl").exists():
            _capture(dumps[mode], mode)
    return dumps


# --------------------------------------------------------------------------- mutations


@dataclass
class Mutant:
    kind: str
    detail: str
    data_changed: bool = False    # tensor bytes differ from what the manifest's writer stored
    header_damaged: bool = False  # a shard header no longer describes its data


def _manifest(path: Path) -> list[str]:
    return (path / "manifest-rank0.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)


def _write_manifest(path: Path, lines: list[str]) -> None:
    (path / "manifest-rank0.jsonl").write_text("".join(lines), encoding="utf-8")


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("data/rank0/*.safetensors"))


def _split_shard(data: bytes) -> tuple[int, int]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, 8 + n


def _dumps(value: object) -> str:
    return json.dumps(value, allow_nan=True)


def _flip_data(path: Path, rng: random.Random) -> Mutant:
    shard = rng.choice(_shards(path))
    data = bytearray(shard.read_bytes())
    _, start = _split_shard(bytes(data))
    where = rng.randrange(start, len(data))
    data[where] ^= rng.choice([1, 2, 4, 8, 16, 32, 64, 128, 255])
    shard.write_bytes(bytes(data))
    return Mutant("data byte flip", f"{shard.name}@{where}", data_changed=True)


def _flip_header(path: Path, rng: random.Random) -> Mutant:
    shard = rng.choice(_shards(path))
    data = bytearray(shard.read_bytes())
    _, start = _split_shard(bytes(data))
    where = rng.randrange(0, start)
    data[where] = rng.randrange(256)
    shard.write_bytes(bytes(data))
    return Mutant("shard header byte", f"{shard.name}@{where}", data_changed=True, header_damaged=True)


def _rewrite_header_entry(path: Path, rng: random.Random) -> Mutant:
    shard = rng.choice(_shards(path))
    data = shard.read_bytes()
    n, start = _split_shard(data)
    header = json.loads(data[8:start])
    key = rng.choice([k for k in header if k != "__metadata__"])
    field = rng.choice(["shape", "data_offsets", "dtype", "swap", "metadata"])
    if field == "shape":
        header[key]["shape"] = rng.choice(HOSTILE_SHAPES)
    elif field == "data_offsets":
        header[key]["data_offsets"] = rng.choice([[0, 2**62], [-8, 0], [10, 2], [0, 0], "0-4", [0, 1, 2]])
    elif field == "dtype":
        header[key]["dtype"] = rng.choice(["F64", "I8", "BOOL", "F8_E4M3", "", 5])
    elif field == "swap":
        other = rng.choice([k for k in header if k != "__metadata__"])
        header[key]["data_offsets"], header[other]["data_offsets"] = header[other]["data_offsets"], header[key]["data_offsets"]
        if header[key]["data_offsets"] == header[other]["data_offsets"]:
            return Mutant("shard header entry", "swap with itself (no change)")
        begin, end = header[key]["data_offsets"]
        if end - begin == header[other]["data_offsets"][1] - header[other]["data_offsets"][0]:
            raw = json.dumps(header).encode()  # a valid header pointing at the wrong bytes: checksums catch it
            shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[start:])
            return Mutant("shard header entry", f"swap of {key} and {other} (alike)", data_changed=True)
    else:
        header["__metadata__"] = {"format": "pt", "note": "rewritten"}
        raw = json.dumps(header).encode()
        shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[start:])
        return Mutant("shard header entry", "metadata rewritten (data intact)")
    raw = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(raw)) + raw + data[start:])
    return Mutant("shard header entry", f"{field} of {key}", data_changed=True, header_damaged=True)


def _truncate_shard(path: Path, rng: random.Random) -> Mutant:
    shard = rng.choice(_shards(path))
    data = shard.read_bytes()
    size = rng.randrange(0, len(data))
    shard.write_bytes(data[:size])
    return Mutant("truncated shard", f"{shard.name} to {size} of {len(data)} bytes", data_changed=True,
                  header_damaged=True)


def _record_field(path: Path, rng: random.Random) -> Mutant:
    lines = _manifest(path)
    index = rng.choice([i for i, line in enumerate(lines) if '"type": "record"' in line or '"type":"record"' in line])
    obj = json.loads(lines[index])
    before = dict(obj)
    field = rng.choice(["shape", "step", "order", "rank", "dtype", "name", "file", "key", "stats", "tags",
                        "checksum", "drop"])
    if field == "shape":
        obj["shape"] = rng.choice(HOSTILE_SHAPES)
    elif field in ("step", "order", "rank"):
        obj[field] = rng.choice(HOSTILE_INTS)
    elif field == "dtype":
        obj["dtype"] = rng.choice(["float8", "", None, "bfloat16", "int8", "object"])
    elif field in ("name", "key"):
        obj[field] = rng.choice(HOSTILE_STRINGS)
    elif field == "file":
        obj["file"] = rng.choice(["/etc/passwd", "../x.safetensors", "data/rank0/../../x.safetensors",
                                  "data/rank0/none.safetensors", 5, "manifest-rank0.jsonl"])
    elif field == "stats":
        stats = rng.choice(HOSTILE_STATS)
        obj["stats"] = {**obj.get("stats", {}), **stats} if isinstance(stats, dict) else stats
    elif field == "tags":
        obj["tags"] = rng.choice([{"layer": -1}, {"layer": 2**62}, {"shard": "split:99"}, {"shard": 5}, [], "t",
                                  {"module": "\x1b[2J"}])
    elif field == "checksum":
        obj["checksum"] = rng.choice(["xxh3_64:0000000000000000", "crc32:1", "", 5, None, "xxh3_64:zz"])
    else:
        del obj[rng.choice([k for k in obj if k != "type"])]
    lines[index] = _dumps(obj) + "\n"
    _write_manifest(path, lines)
    stored = json.loads(lines[index]).get("file") is not None  # statistics-only records have no data
    changed = stored and field in ("dtype", "shape", "key", "file", "checksum") and obj.get(field) != before.get(field)
    return Mutant("record field", f"line {index + 1}: {field}", data_changed=changed)


def _header_field(path: Path, rng: random.Random) -> Mutant:
    lines = _manifest(path)
    obj = json.loads(lines[0])
    field = rng.choice(["world_size", "rank", "mode", "format_version", "layout", "spec", "model", "env"])
    if field in ("world_size", "rank"):
        obj[field] = rng.choice(HOSTILE_INTS)
    elif field == "mode":
        obj["mode"] = rng.choice(["stats", "full", "", None, "other"])
    elif field == "format_version":
        obj["format_version"] = rng.choice(["2.0", "1.99", "1", "x.y", 1.2, None])
    elif field == "layout":
        obj["layout"] = rng.choice([{"tp_size": 0}, {"tp_size": 2**40}, {"dp_rank": -1}, {"other": 1}, [], "l"])
    else:
        obj[field] = rng.choice([{"path": "/nonexistent"}, {"dtype": "\x1b[31m"}, [], "s", {"x": "y" * 5000}])
    lines[0] = _dumps(obj) + "\n"
    _write_manifest(path, lines)
    return Mutant("header field", field)


def _manifest_lines(path: Path, rng: random.Random) -> Mutant:
    lines = _manifest(path)
    op = rng.choice(["duplicate", "drop", "swap", "cut", "garbage", "empty", "second header"])
    i = rng.randrange(1, len(lines))
    if op == "duplicate":
        lines.insert(i, lines[i])
    elif op == "drop":
        del lines[i]
    elif op == "swap":
        j = rng.randrange(0, len(lines))
        lines[i], lines[j] = lines[j], lines[i]
    elif op == "cut":
        text = "".join(lines)
        cut = rng.randrange(0, len(text))
        (path / "manifest-rank0.jsonl").write_text(text[:cut], encoding="utf-8")
        return Mutant("manifest lines", f"cut at {cut}")
    elif op == "garbage":
        lines.insert(i, rng.choice(["{", "[]", "null", "\x00\x01", '{"type": "unknown"}', "1e999"]) + "\n")
    elif op == "empty":
        lines = []
    else:
        lines.insert(i, lines[0])
    _write_manifest(path, lines)
    return Mutant("manifest lines", f"{op} at {i}")


def _raw_json(path: Path, rng: random.Random) -> Mutant:
    """Text a JSON writer would not produce: numbers of thousands of digits, deep nesting, in any line."""
    lines = _manifest(path)
    index = rng.randrange(0, len(lines))
    obj = json.loads(lines[index])
    key = rng.choice([k for k in obj if k != "type"])
    hostile = rng.choice(["9" * 5000, "-" + "1" * 4400, "1e99999", "[" * 50000 + "]" * 50000,
                          '{"a":' * 20000 + "1" + "}" * 20000, '"' + "\\u0000" * 10 + '"'])
    text = lines[index]
    start = text.find(json.dumps(key) + ":")
    if start < 0:
        return Mutant("raw json", "key not found (no change)")
    obj[key] = "__HOSTILE__"
    lines[index] = json.dumps(obj).replace('"__HOSTILE__"', hostile) + "\n"
    _write_manifest(path, lines)
    return Mutant("raw json", f"line {index + 1} {key}: {hostile[:12]}...", data_changed=False)


def _step_line(path: Path, rng: random.Random) -> Mutant:
    lines = _manifest(path)
    steps = [i for i, line in enumerate(lines) if '"type": "step"' in line or '"type":"step"' in line]
    if not steps:
        return Mutant("step line", "none (no change)")
    index = rng.choice(steps)
    obj = json.loads(lines[index])
    obj["tags"] = rng.choice([{"input_ids": "abc"}, {"input_ids": [[1, "x"]]}, {"input_ids": [[2**70]]},
                              {"input_ids": [[-5] * 3]}, {"seq_lens": [10**9]}, {"positions": {"a": 1}},
                              {"input_ids": [[1] * 100000]}, {"attention_mask": [[2.5]]}, [], {"request_ids": [None]}])
    if rng.random() < 0.3:
        obj["step"] = rng.choice(HOSTILE_INTS)
    lines[index] = _dumps(obj) + "\n"
    _write_manifest(path, lines)
    return Mutant("step line", f"line {index + 1}")


def _filesystem(path: Path, rng: random.Random) -> Mutant:
    shard = rng.choice(_shards(path))
    op = rng.choice(["symlink outside", "directory", "fifo", "empty", "symlink loop", "manifest symlink",
                     "manifest fifo", "manifest device"])
    if op.startswith("manifest"):
        target = path / "manifest-rank0.jsonl"
        outside = path.parent / f"{path.name}-outside.jsonl"
        shutil.move(target, outside)
        if op == "manifest symlink":  # to a good manifest outside: read like any other
            target.symlink_to(outside)
        elif op == "manifest fifo":
            os.mkfifo(target)
        else:
            target.symlink_to("/dev/zero")
        return Mutant("filesystem", op)
    shard.unlink()
    if op == "symlink outside":
        shard.symlink_to("/etc/hostname" if os.path.exists("/etc/hostname") else "/dev/null")
    elif op == "directory":
        shard.mkdir()
    elif op == "fifo":
        os.mkfifo(shard)
    elif op == "symlink loop":
        shard.symlink_to(shard.name)
    else:
        shard.write_bytes(b"")
    return Mutant("filesystem", f"{op} in place of {shard.name}", data_changed=True, header_damaged=True)


MUTATIONS: list[tuple[Callable[[Path, random.Random], Mutant], float, str]] = [
    (_flip_data, 3.0, "full"), (_flip_header, 1.0, "full"), (_rewrite_header_entry, 1.0, "full"),
    (_truncate_shard, 1.0, "full"), (_record_field, 3.0, "any"), (_header_field, 1.0, "any"),
    (_manifest_lines, 1.0, "any"), (_filesystem, 0.5, "full"), (_raw_json, 0.7, "any"), (_step_line, 0.7, "any"),
]


# --------------------------------------------------------------------------- running the CLI


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout()


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """``parity ARGS`` in this process: (exit code, stdout, stderr); -1 on a hang."""
    from parity.cli import main

    # strict UTF-8 text streams, like a terminal or a pipe: a lone surrogate cannot be written
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    code = 0
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    except _Timeout:
        code = -1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, out.buffer.getvalue().decode("utf-8"), err.buffer.getvalue().decode("utf-8")  # type: ignore[attr-defined]


def harness_failure(code: int, stderr: str, seconds: int = CASE_SECONDS) -> str | None:
    """What is wrong whatever the input: a hang (``code`` -1), a traceback or internal error, an
    exit code other than 0/1/2, an exit 2 without exactly one error line; None otherwise."""
    if code == -1:
        return f"ran longer than {seconds} s"
    if "Traceback" in stderr or "internal error" in stderr or code not in (0, 1, 2):
        return f"exit {code}: {stderr.strip()[-300:]}"
    if code == 2:
        lines = stderr.strip().splitlines()
        if len(lines) != 1 or ": error:" not in lines[0]:
            return f"exit 2 without one error line: {stderr.strip()[-300:]}"
    return None


def judge(mutant: Mutant, command: str, code: int, stderr: str) -> str | None:
    """Why this command's result on this mutant is wrong, or None when it is handled."""
    if (why := harness_failure(code, stderr)) is not None or code == 2:
        return why
    if mutant.data_changed and command in ("compare", "inspect --verify", "compare --salvage", "inspect --salvage") \
            and not (code == 1 and command.endswith("--salvage")):  # salvage reports corruption with exit 1
        return f"exit {code} on changed tensor bytes ({'a silent pass' if code == 0 else 'reported as a divergence'})"
    if mutant.header_damaged and command == "inspect":
        return "exit 0 on a damaged shard header"
    return None


@dataclass
class CaseResult:
    mutant: Mutant
    failures: list[str]


def run_fuzz(cases: int, seed: int = 0, workdir: Path | None = None,
             progress: Callable[[int], None] | None = None) -> list[CaseResult]:
    """Run ``cases`` seeded mutants; returns one result per case."""
    own = workdir is None
    root = Path(tempfile.mkdtemp(prefix="parity-fuzz-")) if own else Path(workdir)  # type: ignore[arg-type]
    root.mkdir(parents=True, exist_ok=True)
    try:
        dumps = base_dumps(root)
        rng = random.Random(seed)
        weights = [w for _, w, _ in MUTATIONS]
        results = []
        for index in range(cases):
            mutate, _, needs = rng.choices(MUTATIONS, weights=weights)[0]
            mode = "full" if needs == "full" else rng.choice(["full", "stats"])
            case = root / f"case-{index}"
            shutil.copytree(dumps[mode], case, symlinks=True)
            mutant = mutate(case, rng)
            failures = []
            outputs = ["--html", str(root / "r.html"), "--markdown", str(root / "r.md"), "--junit", str(root / "r.xml"),
                       "--json", str(root / "r.json")]
            for command, args in (("compare", ["compare", str(dumps[mode]), str(case), *outputs]),
                                  ("compare --salvage", ["compare", "--salvage", str(dumps[mode]), str(case)]),
                                  ("inspect", ["inspect", str(case)]),
                                  ("inspect --salvage", ["inspect", "--verify", "--salvage", str(case)]),
                                  ("inspect --verify", ["inspect", "--verify", str(case)])):
                code, _, stderr = run_cli(args)
                why = judge(mutant, command, code, stderr)
                if why is not None:
                    failures.append(f"{command}: {why}")
            results.append(CaseResult(mutant, failures))
            remove_tree(case)
            if progress is not None:
                progress(index + 1)
        return results
    finally:
        if own:
            remove_tree(root)


def remove_tree(path: Path) -> None:
    """Delete ``path`` and what a mutant put in it (links and FIFOs first: rmtree would follow or block)."""
    for item in path.rglob("*") if path.exists() else []:
        if item.is_symlink() or (item.exists() and not item.is_dir() and not item.is_file()):
            item.unlink()
    shutil.rmtree(path, ignore_errors=True)


def print_summary(results: list, seed: int, width: int = 22) -> list:
    """Print cases and failures per mutation kind (and seconds, when results carry ``seconds``);
    returns the failing results."""
    per_kind: Counter[str] = Counter()
    failed_kind: Counter[str] = Counter()
    seconds: Counter[str] = Counter()
    timed = all(hasattr(r, "seconds") for r in results)
    for result in results:
        per_kind[result.mutant.kind] += 1
        failed_kind[result.mutant.kind] += bool(result.failures)
        seconds[result.mutant.kind] += getattr(result, "seconds", 0.0)
    print(f"{'mutation':<{width}} {'cases':>6} {'failed':>7}" + (f" {'seconds':>8}" if timed else ""))
    for kind in sorted(per_kind):
        print(f"{kind:<{width}} {per_kind[kind]:>6} {failed_kind[kind]:>7}" + (f" {seconds[kind]:>8.1f}" if timed else ""))
    failures = [r for r in results if r.failures]
    print(f"{'all':<{width}} {len(results):>6} {len(failures):>7}   (seed {seed})")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="work in this directory and keep the base dumps")
    args = parser.parse_args()
    os.environ.setdefault("PARITY_PROGRESS_INTERVAL", "0")

    def tick(done: int) -> None:
        if done % 100 == 0:
            print(f"  {done}/{args.cases} cases", file=sys.stderr, flush=True)

    results = run_fuzz(args.cases, args.seed, args.keep, tick)
    failures = print_summary(results, args.seed)
    for result in failures:
        print(f"- {result.mutant.kind} ({result.mutant.detail}): " + "; ".join(result.failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
