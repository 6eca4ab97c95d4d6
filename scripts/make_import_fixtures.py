"""Regenerate ``tests/fixtures/imported/``: dumps written by the real SGLang dumper and msProbe.

Tools (never installed into parity's own venv; the test suite does not need them):

- msProbe: ``mindstudio-probe==26.2.0`` (PyPI), run on the CPU with torch 2.13.0+cpu and
  transformers 5.19.0::

      python3 -m venv /tmp/msprobe-venv
      /tmp/msprobe-venv/bin/pip install -c constraints.txt torch==2.13.0 transformers \\
          mindstudio-probe==26.2.0 pyzmq polars pydantic einops rich

- SGLang: the dumper module of ``sglang==0.5.23`` run from its source (the package itself
  needs CUDA): ``pip download --no-deps sglang==0.5.23 -d /tmp/sgl-src`` and unzip
  ``sglang/srt/debug_utils/`` from the wheel into ``/tmp/sgl-src``. ``dumper.py`` imports a few
  server modules (a ZMQ socket helper, the runtime context, ``get_device``, the server types
  its SGLang plugin checks values against); they are stubbed here with what a CPU process
  needs: ``get_device() == "cpu"`` and a parallel state in which every rank is one
  tensor-parallel rank (so ``meta`` carries ``sglang_parallel_info`` as on a server). The
  dumper's own code (file names, ``torch.save({"value", "meta"})``, steps, non-intrusive
  module hooks, ``dims``) runs unchanged.

Run: ``/tmp/msprobe-venv/bin/python scripts/make_import_fixtures.py --sglang-src /tmp/sgl-src``
(about 30 s on 2 cores). It writes, with the built-in tiny Llama
(``src/parity/assets/tiny-llama``) and prompt token ids :data:`PROMPT`:

- ``msprobe-tensor/step0/proc0/``: ``task="tensor"``, level L0, ``data_mode=["output"]``, one
  forward pass. msProbe also saves every module's weights (``parameters``); they are removed
  from the fixture (files and ``dump.json`` entries) to keep it small — parity does not import
  them. The ``proc<PID>`` folder is renamed ``proc0`` so regeneration gives the same paths.
- ``msprobe-stats/step{0,1}/proc0/``: ``task="statistics"``, level L0, ``data_mode=["output"]``,
  two forward passes of the prompt.
- both keep ``dump.json`` and ``construct.json``; ``stack.json`` (call stacks, not read by
  parity) is dropped for size.
- ``sglang-llama/``: the dumper's non-intrusive hooks (mode ``all``, a ``filter`` keeping the
  decoder-layer taps) on the tiny Llama, a prefill of :data:`PROMPT` and one decode step with
  the KV cache, plus the token aligner's aux tensors (``input_ids``, ``positions``,
  ``seq_lens``, ``rids``) dumped under the names SGLang's model runner gives them.
- ``sglang-tp2/`` and ``sglang-tp1/``: one small layer (column-parallel linear, row-parallel
  linear before and after its all-reduce) run with 2 ranks (gloo) and with 1, with ``dims``
  (``t h[tp]``, ``t h[tp:partial]``, ``t h # tp:replicated``) as SGLang annotates them.
- ``meta.json``: tool versions and the prompt.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "imported"
MODEL = ROOT / "src" / "parity" / "assets" / "tiny-llama"
#: Token ids of the prompt every fixture runs (the tests capture the same with parity).
PROMPT = [1, 5, 9]
#: The SGLang dumper filter (its own expression language): the decoder-layer taps and aux tensors.
SGLANG_FILTER = ("name in ('input_ids', 'positions', 'seq_lens', 'rids') or search(r'(embed_tokens|layers\\.\\d+"
                 "(\\.(self_attn|mlp|input_layernorm|post_attention_layernorm))?|model\\.norm|lm_head)\\.output$', name)")


def load_model():
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- msProbe
def _msprobe_run(task: str, out: Path, steps: int, data_mode: list[str]) -> Path:
    import torch
    from msprobe.pytorch import PrecisionDebugger

    work = out.with_name(out.name + ".work")
    shutil.rmtree(work, ignore_errors=True)
    config = {"task": task, "dump_path": str(work), "rank": [], "step": [], "level": "L0",
              task: {"scope": [], "list": [], "data_mode": data_mode}}
    config_path = work.with_suffix(".json")
    work.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps(config))
    model = load_model()
    debugger = PrecisionDebugger(config_path=str(config_path))
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        for _ in range(steps):
            debugger.start(model)
            model(ids)
            debugger.stop()
            debugger.step()
    config_path.unlink()
    return work


#: msProbe fixtures: name -> (task, forward passes, data_mode).
MSPROBE_RUNS = {"msprobe-tensor": ("tensor", 1, ["output"]), "msprobe-stats": ("statistics", 2, ["output"])}


def make_msprobe(out_root: Path, name: str) -> None:
    """One msProbe fixture (run in a process of its own: PrecisionDebugger is a singleton)."""
    task, steps, data_mode = MSPROBE_RUNS[name]
    work = _msprobe_run(task, out_root / name, steps, data_mode)
    if True:
        for proc in work.glob("step*/proc*"):
            proc.rename(proc.with_name("proc0"))
        for rank_dir in work.glob("step*/proc0"):
            dump_json = rank_dir / "dump.json"
            dump = json.loads(dump_json.read_text())
            for call in dump["data"].values():
                for item in (call.get("parameters") or {}).values():
                    data_name = item.get("data_name") if isinstance(item, dict) else None
                    if data_name:
                        (rank_dir / "dump_tensor_data" / data_name).unlink(missing_ok=True)
                if name == "msprobe-tensor":
                    call["parameters"] = {}
            dump["dump_data_dir"] = None if dump.get("dump_data_dir") is None else "dump_tensor_data"
            dump_json.write_text(json.dumps(dump))
            (rank_dir / "stack.json").unlink(missing_ok=True)  # call stacks: not read by parity, large
        target = out_root / name
        shutil.rmtree(target, ignore_errors=True)
        work.rename(target)


# ----------------------------------------------------------------------------- SGLang
def import_dumper(sglang_src: Path) -> types.ModuleType:
    """sglang's dumper.py from source, with the server modules it imports at the top stubbed."""
    def stub(name: str, **attrs) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
        return module

    def unavailable(*_args, **_kwargs):
        raise RuntimeError("not available outside an SGLang server")

    def parallel() -> types.SimpleNamespace:
        """The server's parallel state for a plain tensor-parallel run: every rank one TP rank."""
        import torch.distributed as dist

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return types.SimpleNamespace(tp_rank=rank, tp_size=world, pp_rank=0, pp_size=1, moe_ep_rank=0,
                                     moe_ep_size=1, moe_tp_rank=rank, moe_tp_size=world, moe_dp_rank=0,
                                     attn_tp_rank=rank, attn_tp_size=world, attn_dp_rank=0, attn_dp_size=1,
                                     attn_cp_rank=0, attn_cp_size=1)

    class _Never:  # server types the dumper's SGLang plugin tests values against: never seen here
        pass

    stub("sglang", __path__=[str(sglang_src / "sglang")])
    stub("sglang.srt", __path__=[str(sglang_src / "sglang" / "srt")])
    stub("sglang.srt.managers", __path__=[])
    stub("sglang.srt.managers.io_struct", sock_recv=unavailable, sock_send=unavailable, wrap_as_pickle=unavailable)
    stub("sglang.srt.runtime_context", get_parallel=parallel, get_server_args=lambda: None,
         get_serving=unavailable)
    stub("sglang.srt.utils", get_device=lambda: "cpu")
    # what the dumper's SGLang plugin imports, so it records sglang_parallel_info as a server does
    sys.modules["sglang.srt"].distributed = stub("sglang.srt.distributed")
    stub("sglang.srt.layers", __path__=[])
    stub("sglang.srt.layers.dp_attention", is_dp_attention_enabled=lambda: False, get_moe_cp_size=lambda: 1)
    sys.modules["sglang.srt.layers"].dp_attention = sys.modules["sglang.srt.layers.dp_attention"]
    stub("sglang.srt.layers.logits_processor", LogitsProcessorOutput=_Never)
    stub("sglang.srt.model_executor", __path__=[])
    stub("sglang.srt.model_executor.forward_batch_info", ForwardBatch=_Never, PPProxyTensors=_Never)
    stub("sglang.srt.layers.layer_boundary", __path__=[])
    stub("sglang.srt.layers.layer_boundary.output", UnreducedOutput=_Never)
    stub("sglang.srt.layers.layer_boundary.residual", __path__=[])
    stub("sglang.srt.layers.layer_boundary.residual.stream", OwedOutput=_Never)
    path = sglang_src / "sglang" / "srt" / "debug_utils" / "dumper.py"
    spec = importlib.util.spec_from_file_location("sglang.srt.debug_utils.dumper", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def make_sglang_llama(sglang_src: Path, out: Path) -> None:
    import torch

    dumper_module = import_dumper(sglang_src)
    shutil.rmtree(out, ignore_errors=True)
    config = dumper_module.DumperConfig(enable=True, dir=str(out.parent), exp_name=out.name, non_intrusive_mode="all",
                                        filter=SGLANG_FILTER, enable_output_console=False)
    dumper = dumper_module._Dumper(config=config)
    model = load_model()
    dumper.register_non_intrusive_dumper(model)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        # prefill: one packed sequence of len(PROMPT) tokens (SGLang's seq_lens: the full length)
        dumper.dump("input_ids", ids.reshape(-1))
        dumper.dump("positions", torch.arange(len(PROMPT)))
        dumper.dump("seq_lens", torch.tensor([len(PROMPT)]))
        dumper.dump("rids", ["req-0"])
        out_prefill = model(ids, use_cache=True)
        dumper.step()
        # decode: one token at position len(PROMPT), the KV cache holding the prompt
        next_id = out_prefill.logits[:, -1].argmax(-1, keepdim=True)
        dumper.dump("input_ids", next_id.reshape(-1))
        dumper.dump("positions", torch.tensor([len(PROMPT)]))
        dumper.dump("seq_lens", torch.tensor([len(PROMPT) + 1]))
        dumper.dump("rids", ["req-0"])
        model(next_id, past_key_values=out_prefill.past_key_values, use_cache=True,
              position_ids=torch.tensor([[len(PROMPT)]]))
        dumper.step()


def _tp_layer(rank: int, world: int, out: Path, sglang_src: Path) -> None:
    """One layer with tensor parallelism as SGLang shards it; run on every rank."""
    import torch
    import torch.distributed as dist

    dumper_module = import_dumper(sglang_src)
    config = dumper_module.DumperConfig(enable=True, dir=str(out.parent), exp_name=out.name,
                                        enable_output_console=False)
    dumper = dumper_module._Dumper(config=config)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=generator)
    w1 = torch.randn(8, 16, generator=generator) / 3
    w2 = torch.randn(16, 8, generator=generator) / 4
    cols = 16 // world
    for step in range(2):
        xs = x * (step + 1)
        dumper.dump("input_ids", torch.tensor([3, 1, 4, 1]))
        dumper.dump("positions", torch.arange(4) + 4 * step)
        dumper.dump("seq_lens", torch.tensor([4 * (step + 1)]))
        hidden = xs @ w1[:, rank * cols:(rank + 1) * cols]
        dumper.dump("mlp_up", hidden, dims="t h[tp]", layer_id=0)
        partial = torch.relu(hidden) @ w2[rank * cols:(rank + 1) * cols]
        dumper.dump("mlp_down_partial", partial, dims="t h[tp:partial]", layer_id=0)
        if world > 1:
            dist.all_reduce(partial)
        dumper.dump("mlp_out", partial, dims="t h # tp:replicated", layer_id=0)
        dumper.step()


def _tp_worker(rank: int, world: int, out: str, sglang_src: str, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _tp_layer(rank, world, Path(out), Path(sglang_src))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def make_sglang_tp(sglang_src: Path, out_root: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    for world in (1, 2):
        out = out_root / f"sglang-tp{world}"
        shutil.rmtree(out, ignore_errors=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_tp_worker, args=(world, str(out), str(sglang_src), port), nprocs=world, join=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sglang-src", type=Path, required=True,
                        help="folder holding sglang/srt/debug_utils/ from the sglang wheel")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--msprobe-only", choices=sorted(MSPROBE_RUNS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from importlib.metadata import version

    args.out.mkdir(parents=True, exist_ok=True)
    if args.msprobe_only:
        make_msprobe(args.out, args.msprobe_only)
        return
    import subprocess

    for name in MSPROBE_RUNS:
        subprocess.run([sys.executable, __file__, "--sglang-src", str(args.sglang_src), "--out", str(args.out),
                        "--msprobe-only", name], check=True)
    make_sglang_llama(args.sglang_src, args.out / "sglang-llama")
    make_sglang_tp(args.sglang_src, args.out)
    meta = {"prompt": PROMPT, "model": "src/parity/assets/tiny-llama", "dtype": "float32",
            "mindstudio-probe": version("mindstudio-probe"), "torch": version("torch"),
            "transformers": version("transformers"), "sglang_dumper_source": "sglang==0.5.23 (wheel, debug_utils/dumper.py)",
            "script": "scripts/make_import_fixtures.py"}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
