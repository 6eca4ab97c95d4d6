"""parity against the tools' own comparators, on the same msProbe and SGLang dumps.

The dumps: the built-in tiny Llama (float32, CPU) on a prompt of ``--tokens`` token ids
(default 256), once clean and once with a fault injected (layer 2's MLP ``down_proj`` weight
scaled by ``--scale``, default 1.01), dumped by msProbe (``task="tensor"``, level L0, ``data_mode=["output"]``) and by SGLang's
dumper run from source (non-intrusive hooks, the decoder-layer taps; as
``scripts/make_import_fixtures.py`` does). Then, wall time of each command as a user runs it
(process start included), best of ``--repeat`` (default 3):

- msProbe: ``msprobe compare --target_path FAULTY/step0 --golden_path CLEAN/step0``; its first
  row (execution order) whose Result is not ``pass`` is its first divergence.
- SGLang: ``python -m sglang.srt.debug_utils.comparator --baseline-path CLEAN --target-path
  FAULTY`` (from source, server modules stubbed as in the fixture script); its failed tensors.
- parity: ``parity compare CLEAN FAULTY --json ...`` on the same folders (imported in memory).

Prints each tool's verdict, first divergence and time, and the ratio tool time / parity time.
The tools live in a separate venv (``--tools-python``, default ``/tmp/msprobe-venv/bin/python``,
set up as in ``scripts/make_import_fixtures.py``) and SGLang's source in ``--sglang-src``
(default ``/tmp/sgl-src``). A tool that is not there is reported as skipped; the bench exits 0.

Run: ``.venv/bin/python bench/imported_vs_tools.py``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARITY = [str(Path(sys.executable).parent / "parity")]
MODEL = ROOT / "src" / "parity" / "assets" / "tiny-llama"
#: The decoder-layer taps kept by SGLang's dumper (its own filter language).
SGLANG_FILTER = ("search(r'(embed_tokens|layers\\.\\d+(\\.(self_attn|mlp|input_layernorm|post_attention_layernorm))?"
                 "|model\\.norm|lm_head)\\.output$', name)")


# ----------------------------------------------------------------------------- dumping (tools venv)
def _model_and_ids(tokens: int, scale: float | None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    if scale is not None:  # in the weights, so every tool's hooks see it (msProbe's run before a model's own)
        with torch.no_grad():
            model.model.layers[2].mlp.down_proj.weight.mul_(scale)
    ids = ((torch.arange(tokens) * 7 + 1) % 500).reshape(1, -1)
    return model, ids


def generate(kind: str, out: Path, tokens: int, sglang_src: Path, scale: float) -> None:
    """Write one dump (runs in the tools venv): ``msprobe-clean``, ``msprobe-faulty``, ``sglang-clean``,
    ``sglang-faulty``."""
    import torch

    model, ids = _model_and_ids(tokens, scale if kind.endswith("faulty") else None)
    if kind.startswith("msprobe"):
        from msprobe.pytorch import PrecisionDebugger

        config = out.with_suffix(".json")
        config.write_text(json.dumps({"task": "tensor", "dump_path": str(out), "rank": [], "step": [], "level": "L0",
                                      "tensor": {"scope": [], "list": [], "data_mode": ["output"]}}))
        debugger = PrecisionDebugger(config_path=str(config))
        with torch.no_grad():
            debugger.start(model)
            model(ids)
            debugger.stop()
            debugger.step()
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    from make_import_fixtures import import_dumper

    dumper_module = import_dumper(sglang_src)
    config = dumper_module.DumperConfig(enable=True, dir=str(out.parent), exp_name=out.name, non_intrusive_mode="all",
                                        filter=SGLANG_FILTER, enable_output_console=False)
    dumper = dumper_module._Dumper(config=config)
    dumper.register_non_intrusive_dumper(model)
    with torch.no_grad():
        model(ids)
        dumper.step()


# ----------------------------------------------------------------------------- timing (parity venv)
def timed(command: list[str], repeat: int) -> tuple[float, subprocess.CompletedProcess]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        best = min(best, time.perf_counter() - start)
    return best, result


def tool_available(python: str, code: str) -> str | None:
    """None when ``python -c code`` runs, else why not (one line)."""
    if not Path(python).exists():
        return f"{python} does not exist"
    result = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return None if result.returncode == 0 else (result.stderr.strip().splitlines() or ["failed"])[-1]


def parity_compare(clean: Path, faulty: Path, work: Path, repeat: int) -> dict:
    report = work / f"parity-{clean.name}.json"
    seconds, result = timed([*PARITY, "compare", str(clean), str(faulty), "--json", str(report)], repeat)
    if result.returncode == 2:
        return {"seconds": seconds, "verdict": "error", "first": result.stderr.strip()[:200]}
    data = json.loads(report.read_text())
    first = data.get("first_divergence") or {}
    summary = data.get("summary", {})
    return {"seconds": seconds, "verdict": summary.get("verdict"), "first": first.get("name"),
            "detail": f"{summary.get('failed')} of {summary.get('pairs')} pairs failed"}


def msprobe_compare(python: str, clean: Path, faulty: Path, work: Path, repeat: int) -> dict:
    from parity.store.importers.msprobe import split_name

    out = work / "msprobe-compare"
    shutil.rmtree(out, ignore_errors=True)
    seconds, result = timed([python, "-m", "msprobe.msprobe", "compare", "--target_path", str(faulty / "step0"),
                             "--golden_path", str(clean / "step0"), "--output_path", str(out)], repeat)
    files = sorted(out.glob("compare_result_*.csv")) if out.exists() else []
    if result.returncode != 0 or not files:
        return {"seconds": seconds, "verdict": "error", "first": (result.stderr.strip().splitlines() or ["?"])[-1]}
    with open(files[-1], newline="") as fh:
        rows = list(csv.DictReader(fh))
    failing = [r for r in rows if str(r.get("Result", "")).lower() not in ("pass", "")]
    first = None
    if failing:
        call = failing[0]["NPU Name"].split(".output")[0]
        parsed = split_name(call)
        first = parsed[0] if parsed else call
    return {"seconds": seconds, "verdict": "fail" if failing else "pass", "first": first,
            "detail": f"{len(failing)} of {len(rows)} rows not pass"}


def sglang_compare(python: str, sglang_src: Path, clean: Path, faulty: Path, work: Path, repeat: int) -> dict:
    runner = work / "sglang_comparator.py"
    runner.write_text(
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'scripts')!r})\n"
        "from pathlib import Path\nfrom make_import_fixtures import import_dumper\n"
        f"import_dumper(Path({str(sglang_src)!r}))\n"
        "sys.argv = ['comparator', *sys.argv[1:]]\n"
        "runpy.run_module('sglang.srt.debug_utils.comparator', run_name='__main__')\n")
    report = work / "sglang-report.jsonl"
    seconds, result = timed([python, str(runner), "--baseline-path", str(clean), "--target-path", str(faulty),
                             "--output-format", "json", "--report-path", str(report)], repeat)
    if not report.exists():
        return {"seconds": seconds, "verdict": "error", "first": (result.stderr.strip().splitlines() or ["?"])[-1]}
    lines = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
    failed = [r for r in lines if r.get("type") == "comparison_tensor" and not r.get("diff", {}).get("passed", True)]
    summary = next((r for r in lines if r.get("type") == "summary"), {})
    from parity.store.importers.sglang import record_name

    return {"seconds": seconds, "verdict": "fail" if failed or summary.get("failed") else "pass",
            "first": record_name({"name": failed[0]["name"]}) if failed else None,
            "detail": f"passed {summary.get('passed')}, failed {summary.get('failed')}, skipped {summary.get('skipped')}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tools-python", default="/tmp/msprobe-venv/bin/python")
    parser.add_argument("--sglang-src", type=Path, default=Path("/tmp/sgl-src"))
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.01,
                        help="the fault: layer 2's MLP down_proj weight times this (default 1.01)")
    parser.add_argument("--generate", nargs=2, metavar=("KIND", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(args.generate[0], Path(args.generate[1]), args.tokens, args.sglang_src, args.scale)
        return
    python = args.tools_python
    why_msprobe = tool_available(python, "import msprobe, transformers")
    why_sglang = tool_available(python, "import polars, pydantic, einops, zmq, transformers") or (
        None if (args.sglang_src / "sglang/srt/debug_utils/dumper.py").exists()
        else f"no SGLang source in {args.sglang_src}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="parity-bench-imports-") as tmp:
        work = Path(tmp)
        for tool, why in (("msprobe", why_msprobe), ("sglang", why_sglang)):
            if why is not None:
                print(f"{tool}: skipped ({why})")
                continue
            dumps = {}
            for side in ("clean", "faulty"):
                out = work / f"{tool}-{side}"
                subprocess.run([python, __file__, "--tokens", str(args.tokens), "--sglang-src", str(args.sglang_src),
                                "--scale", str(args.scale),
                                "--generate", f"{tool}-{side}", str(out)], check=True, capture_output=True)
                dumps[side] = out
            theirs = (msprobe_compare(python, dumps["clean"], dumps["faulty"], work, args.repeat) if tool == "msprobe"
                      else sglang_compare(python, args.sglang_src, dumps["clean"], dumps["faulty"], work, args.repeat))
            ours = parity_compare(dumps["clean"], dumps["faulty"], work, args.repeat)
            rows.append((tool, theirs, ours))
    from importlib.metadata import PackageNotFoundError, version

    try:
        msprobe_version = subprocess.run([python, "-c", "from importlib.metadata import version; "
                                          "print(version('mindstudio-probe'))"], capture_output=True, text=True).stdout.strip()
    except OSError:
        msprobe_version = "?"
    try:
        parity_version = version("parity")
    except PackageNotFoundError:
        parity_version = "?"
    print(f"tiny Llama, float32, {args.tokens} tokens; fault: layer 2 MLP down_proj weight x{args.scale}; "
          f"best of {args.repeat} "
          f"(wall time, process start included); mindstudio-probe {msprobe_version or '?'}, SGLang dumper and "
          f"comparator from sglang 0.5.23 source; parity {parity_version}")
    for tool, theirs, ours in rows:
        print(f"\n[{tool} dumps]")
        print(f"  {tool:8} {theirs['seconds']:6.2f} s  verdict {theirs['verdict']:5}  first divergence "
              f"{theirs['first']}  ({theirs.get('detail', '')})")
        print(f"  {'parity':8} {ours['seconds']:6.2f} s  verdict {ours['verdict']:5}  first divergence {ours['first']}"
              f"  ({ours.get('detail', '')})")
        print(f"  ratio {tool} / parity: {theirs['seconds'] / ours['seconds']:.2f}x; same first divergence: "
              f"{theirs['first'] == ours['first']}")


if __name__ == "__main__":
    main()
