"""Opt-in capture of module inputs, parameter fingerprints and call sites, and the blame they allow.

On the built-in tiny model (real transformers): a changed weight is named as the first divergence
with "the weights differ"; a module whose inputs and weights agree but whose output does not is
blamed; a fault in untapped code (the rotary embedding) shows up as a differing input "between
taps"; a bfloat16 run holds the same weights as the float32 one after rounding and passes.
"""

from __future__ import annotations

import json

import pytest
import torch

import parity

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


def _load(tiny_model_dir, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()


def _capture(model, out=None, **options):
    options = {"inputs": True, "parameters": True, **options}
    with torch.no_grad(), parity.capture(model, out, **options) as session:
        model(IDS)
    return session


@pytest.fixture(scope="module")
def baseline(tiny_model_dir):
    return _capture(_load(tiny_model_dir), call_sites=True)


def test_records_inputs_fingerprints_and_call_sites_before_the_output(baseline):
    records = [r for r in baseline.run.records if r.name.startswith("model.layers.2.mlp")]
    names = [r.name for r in records]
    assert names == ["model.layers.2.mlp.parameters.gate_proj.weight", "model.layers.2.mlp.parameters.up_proj.weight",
                     "model.layers.2.mlp.parameters.down_proj.weight", "model.layers.2.mlp.input.0",
                     "model.layers.2.mlp"]
    weight = records[2]
    assert weight.file is None and weight.tags["role"] == "parameter" and weight.shape == (128, 256)
    assert {"digest", "digest_bfloat16", "digest_float16"} <= set(weight.tags)
    assert weight.stats["l2"] > 0
    assert records[3].tags["role"] == "input" and records[3].file is not None
    site = records[4].tags["call_site"][0]
    assert "modeling_llama.py" in site and "self.mlp(" in site
    # keyword arguments are recorded by name, flattened like outputs
    kwargs = {r.name for r in baseline.run.records if r.name.startswith("model.layers.0.self_attn.kwargs.")}
    assert {"model.layers.0.self_attn.kwargs.hidden_states",
            "model.layers.0.self_attn.kwargs.position_embeddings.0"} <= kwargs
    # each parameter once, under the innermost tapped module (the decoder layer holds none itself)
    assert not [r for r in baseline.run.records if r.name.startswith("model.layers.2.parameters.")]


def test_outputs_unchanged_and_nothing_extra_by_default(tiny_model_dir):
    model = _load(tiny_model_dir)
    with torch.no_grad():
        bare = model(IDS).logits
    with torch.no_grad(), parity.capture(model) as plain:
        first = model(IDS).logits
    with torch.no_grad(), parity.capture(model, inputs=True, parameters=True, call_sites=True):
        second = model(IDS).logits
    assert torch.equal(bare, first) and torch.equal(bare, second)
    assert not any(r.tags.get("role") or "call_site" in r.tags for r in plain.run.records)


def test_changed_weight_is_the_first_divergence(tiny_model_dir, baseline):
    model = _load(tiny_model_dir)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] += 0.01
    report = parity.compare(baseline, _capture(model))
    first = report.first_divergence
    assert first.name == "model.layers.2.mlp.parameters.down_proj.weight"
    assert first.kind == "fail" and "weights differ" in first.reason
    assert report.attribution["verdict"] == "parameters"
    assert report.attribution["module"] == "model.layers.2.mlp"
    data = report.to_json()
    assert data["first_divergence"]["role"] == "parameter"
    assert data["first_divergence"]["attribution"]["verdict"] == "parameters"


def test_module_blamed_when_its_inputs_and_weights_agree(tiny_model_dir, baseline):
    model = _load(tiny_model_dir)
    model.model.layers[2].mlp.register_forward_hook(lambda module, args, out: out * 1.001)
    report = parity.compare(baseline, _capture(model))
    assert report.first_divergence.name == "model.layers.2.mlp"
    assert report.attribution["verdict"] == "module"
    assert report.attribution["inputs"] == 1 and report.attribution["parameters"] == 3
    json.dumps(report.to_json())


def test_fault_in_untapped_code_is_found_between_taps(tiny_model_dir, baseline):
    model = _load(tiny_model_dir)
    model.model.rotary_emb.register_forward_hook(lambda module, args, out: (out[0] * 1.001, out[1]))
    report = parity.compare(baseline, _capture(model))
    assert report.first_divergence.name == "model.layers.0.kwargs.position_embeddings.0"
    assert report.attribution["verdict"] == "between taps"
    assert "model.embed_tokens" in report.attribution["text"]


def test_bfloat16_weights_are_the_float32_ones_rounded(tiny_model_dir, baseline):
    model = _load(tiny_model_dir, torch.bfloat16)
    report = parity.compare(baseline, _capture(model))
    parameters = [o for o in report.outcomes if o.role == "parameter"]
    assert len(parameters) == len(list(model.named_parameters()))  # every parameter once
    assert all(o.kind == "pass" and "rounded to bfloat16" in o.reason for o in parameters)
    assert report.verdict == "pass"
    # inputs do not stand in for outputs in the depth profile
    assert all(".input." not in layer.worst_name and ".kwargs." not in layer.worst_name for layer in report.layers)


def test_weights_changed_beyond_rounding_fail_across_dtypes(tiny_model_dir, baseline):
    model = _load(tiny_model_dir, torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight.mul_(1.05)
    report = parity.compare(baseline, _capture(model))
    failing = [o.name for o in report.outcomes if o.role == "parameter" and not o.ok]
    assert failing == ["model.layers.1.input_layernorm.parameters.weight"]


def test_blame_shown_in_terminal_and_dump_round_trip(tiny_model_dir, tmp_path, baseline):
    from parity.report.terminal import make_console, render

    model = _load(tiny_model_dir)
    model.model.layers[1].mlp.register_forward_hook(lambda module, args, out: out * 1.001)
    base_dir, target_dir = tmp_path / "b", tmp_path / "t"
    _capture(_load(tiny_model_dir), base_dir, call_sites=True)
    _capture(model, target_dir, call_sites=True)
    report = parity.compare(base_dir, target_dir)  # fingerprints survive the manifest
    assert report.attribution["verdict"] == "module"
    assert report.first_divergence.call_site and "self.mlp(" in report.first_divergence.call_site[0]
    import io

    out = io.StringIO()
    render(report, make_console(file=out))
    text = out.getvalue()
    assert "blame (module): model.layers.1.mlp is blamed" in text
    assert "called from" in text and "modeling_llama.py" in text
    from parity.report.html import render_html
    from parity.report.markdown import render_markdown

    page = render_html(report.to_json())
    assert 'id="blame"' in page and "model.layers.1.mlp is blamed" in page and 'id="call-site"' in page
    markdown = render_markdown(report.to_json())
    assert "blame (module)" in markdown and "modeling_llama.py" in markdown


def test_argument_passed_on_one_side_only_is_reported_not_failing(tiny_model_dir, baseline):
    """Eager attention gets a 4-D mask, sdpa None: a kwarg one side lacks is not a divergence."""
    from transformers import AutoModelForCausalLM

    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    eager = _load(tiny_model_dir)
    eager.config._attn_implementation = "eager"
    report = parity.compare(_capture(eager), _capture(sdpa))
    one_sided = [o for o in report.outcomes if o.kind.startswith("missing")]
    assert one_sided and all(o.allowed and o.role == "input" and ".kwargs.attention_mask" in o.name
                             for o in one_sided)
    assert report.verdict == "pass"


def test_explain_without_replay_blames_from_the_records(tiny_model_dir, tmp_path):
    """Dumps that name no model (as vLLM's or imported ones cannot be replayed) are explained from
    their inputs and parameters; without them explain says how to record them, in one line."""
    import subprocess
    import sys

    model = _load(tiny_model_dir)
    _capture(model, tmp_path / "b")
    model.model.layers[1].mlp.register_forward_hook(lambda module, args, out: out * 1.001)
    _capture(model, tmp_path / "t")
    result = subprocess.run([sys.executable, "-m", "parity.cli", "explain", str(tmp_path / "b"), str(tmp_path / "t")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "without replay" in result.stdout
    assert "blame (module): model.layers.1.mlp is blamed" in result.stdout
    plain_b, plain_t = tmp_path / "pb", tmp_path / "pt"
    for out in (plain_b, plain_t):
        with torch.no_grad(), parity.capture(model, out):
            model(IDS)
    refused = subprocess.run([sys.executable, "-m", "parity.cli", "explain", str(plain_b), str(plain_t)],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "--inputs --parameters" in refused.stderr


def test_diff_records_inputs_and_parameters_on_request(tmp_path):
    """`parity diff --inputs --parameters` on the built-in model: both dumps hold them, the run
    passes (bf16 weights are the fp32 ones rounded); against vLLM the options are refused."""
    import subprocess
    import sys

    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "parity.cli", "diff", "--inputs", "--parameters", "--new-tokens", "2",
                             "--out", str(out), "--json", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    pairs = json.loads((tmp_path / "r.json").read_text())["pairs"]
    parameters = [p for p in pairs if p.get("role") == "parameter"]
    assert parameters and all(p["outcome"] == "pass" for p in parameters)
    assert any(p.get("role") == "input" for p in pairs)
    refused = subprocess.run([sys.executable, "-m", "parity.cli", "diff", "--parameters", "--target", "engine=vllm",
                              "--out", str(tmp_path / "v")], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "canonical taps only" in refused.stderr
