"""Tokens beside the comparison: decoded token text at the first divergence's worst positions and
at positions whose token ids differ between the runs (``parity compare``, terminal, JSON, HTML)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import parity

PARITY = [sys.executable, "-m", "parity.cli"]


def _dump(model, ids: list[int], out: Path, model_dir: Path, scale: float | None = None) -> Path:
    handle = None
    if scale is not None:
        handle = model.model.layers[1].mlp.register_forward_hook(lambda m, a, o: o * scale)
    try:
        with torch.no_grad(), parity.capture(model, out, model_info={"path": str(model_dir)}):
            model(torch.tensor([ids]))
    finally:
        if handle is not None:
            handle.remove()
    return out


@pytest.fixture(scope="module")
def dumps(tmp_path_factory, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]
    other = list(ids)
    other[3] = tokenizer(" cat", add_special_tokens=False)["input_ids"][0]
    root = tmp_path_factory.mktemp("tokens")
    return {"base": _dump(model, ids, root / "base", tiny_model_dir),
            "fault": _dump(model, ids, root / "fault", tiny_model_dir, scale=1.01),
            "other": _dump(model, other, root / "other", tiny_model_dir),
            "decode": tokenizer.decode, "ids": ids, "other_ids": other}


def test_worst_positions_are_shown_with_their_tokens(dumps, tmp_path):
    report_path = tmp_path / "r.json"
    result = subprocess.run([*PARITY, "compare", str(dumps["base"]), str(dumps["fault"]), "--json", str(report_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    line = next(l for l in result.stdout.splitlines() if "worst positions of" in l)
    positions = json.loads(report_path.read_text())["first_divergence"]["positions"]
    assert positions["tokens"] == [dumps["decode"]([i]) for i in dumps["ids"]]  # the recorded model's tokenizer
    worst = max(range(len(positions["rel_l2"])), key=lambda i: positions["rel_l2"][i])
    assert f"{worst} #{dumps['ids'][worst]} {positions['tokens'][worst]!r}" in line


def test_differing_token_ids_are_flagged_with_text(dumps, tmp_path):
    report_path, page = tmp_path / "r.json", tmp_path / "r.html"
    result = subprocess.run([*PARITY, "compare", str(dumps["base"]), str(dumps["other"]), "--allow-incomparable",
                             "--json", str(report_path), "--html", str(page)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode in (0, 1), result.stderr
    data = json.loads(report_path.read_text())
    (item,) = data["input_differences"]
    assert item["positions"] == [3] and item["count"] == 1
    assert item["baseline_tokens"] == [dumps["decode"]([dumps["ids"][3]])]
    new_token = dumps["decode"]([dumps["other_ids"][3]])
    assert item["target_tokens"] == [new_token] and new_token != item["baseline_tokens"][0]
    assert "inputs differ: step 0: 1 token positions" in result.stdout and repr(new_token) in result.stdout
    assert 'id="input-differences"' in page.read_text()
    # without --allow-incomparable the same comparison is refused in one line, naming the tokens
    refused = subprocess.run([*PARITY, "compare", str(dumps["base"]), str(dumps["other"])],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and repr(new_token) in refused.stderr


def test_tokenizer_option_must_point_at_a_tokenizer(dumps, tmp_path):
    result = subprocess.run([*PARITY, "compare", str(dumps["base"]), str(dumps["fault"]), "--tokenizer", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no tokenizer.json" in result.stderr


def test_token_alignment_names_the_differing_tokens(dumps, tmp_path):
    report_path = tmp_path / "r.json"
    result = subprocess.run([*PARITY, "compare", str(dumps["base"]), str(dumps["other"]), "--align", "tokens",
                             "--json", str(report_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    tokens = [p for p in json.loads(report_path.read_text())["pairs"] if p["name"] == "tokens"]
    new_token = dumps["decode"]([dumps["other_ids"][3]])
    assert tokens and "token ids differ from position 3 on" in tokens[0]["reason"]
    assert repr(new_token) in tokens[0]["reason"]
