"""parity.testing.assert_close, tolerance profiles and the pytest plugin, as a test author uses them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from parity.compare.profile import load_profile
from parity.errors import UsageError
from parity.testing import ParityAssertionError, assert_close, resolve_tolerance

PROFILE = textwrap.dedent("""
    [[tolerance]]
    backend = "rocm-*"
    dtype = "float32"
    pattern = "int8_*"
    atol = 5e-3
    rtol = 1e-2
    note = "int8 weight-only dequantize path of this test, max |d| 4.6e-3 measured 2026-11-22"

    [[tolerance]]
    pattern = "**"
    dtype = "float32"
    rtol = 1e-5
    atol = 1e-6
    note = "fp32 reference kernels"
""")


def int8_weight_only_outputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A real int8 weight-only quantize/dequantize path (per-channel symmetric) vs fp32."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 64)
    x = torch.randn(1, 32)
    weight = linear.weight.detach()
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    q = torch.clamp(torch.round(weight / scale), -128, 127).to(torch.int8)
    with torch.no_grad():
        return torch.nn.functional.linear(x, q.float() * scale, linear.bias), linear(x)


def test_incident_2_message_says_which_tolerance_applied_and_what_would_pass():
    actual, expected = int8_weight_only_outputs()
    with pytest.raises(ParityAssertionError) as info:
        assert_close(actual, expected, name="int8_wo_quant_save_load")
    message = str(info.value)
    print(message)  # shown with -s: the message a user sees
    assert "Mismatched elements: 60 / 64 (93.8%)" in message  # parity's fp32 default with its scale floor
    assert "Worst failing element: index (0, " in message
    assert "Greatest absolute difference:" in message and "at index (0, " in message
    assert "Greatest relative difference:" in message
    assert "from default for float32" in message
    d = info.value.details
    # copying the smallest passing tolerance from the message makes the check pass
    assert_close(actual, expected, rtol=d["rtol"], atol=d["needed_atol"])
    assert_close(actual, expected, rtol=d["needed_rtol"], atol=d["atol"])
    with pytest.raises(ParityAssertionError):
        assert_close(actual, expected, rtol=d["rtol"], atol=d["needed_atol"] * 0.99)


def test_profile_entry_for_the_backend_passes_the_quantized_path(tmp_path):
    path = tmp_path / "profile.toml"
    path.write_text(PROFILE)
    actual, expected = int8_weight_only_outputs()
    assert_close(actual, expected, profile=path, backend="rocm-gfx950", name="int8_wo_linear")
    with pytest.raises(ParityAssertionError) as info:  # same path on another backend: general entry
        assert_close(actual, expected, profile=path, backend="cuda-h100", name="int8_wo_linear")
    assert "profile profile.toml: ** [dtype=float32] (fp32 reference kernels)" in str(info.value)
    tol = resolve_tolerance("float32", name="int8_wo_linear", profile=path, backend="rocm-gfx950")
    assert (tol.rtol, tol.atol) == (1e-2, 5e-3) and "rocm-gfx950" in tol.source


def test_incident_1_absolute_floor_for_small_scores():
    expected = np.array([0.1, 0.62, 0.87])  # text-text, image, multimodal scores
    actual = expected + np.array([0.0055, 0.004, -0.005])
    with pytest.raises(ParityAssertionError) as info:
        assert_close(actual, expected, rtol=1e-2, atol=0.0)
    assert "Mismatched elements: 1 / 3" in str(info.value) and "index (0,)" in str(info.value)
    assert_close(actual, expected, rtol=1e-2, atol=0.006)  # the FLEX_ATTENTION floor


def test_nested_structures_name_the_failing_path_and_rules_differ():
    expected = {"logits": [np.zeros(3), np.ones(2)], "loss": 1.0}
    actual = {"logits": [np.zeros(3), np.array([1.0, 1.5])], "loss": 1.0}
    with pytest.raises(ParityAssertionError) as info:
        assert_close(actual, expected)
    assert "path: actual['logits'][1]" in str(info.value)
    with pytest.raises(ParityAssertionError, match="dict keys differ"):
        assert_close({"a": 1.0}, {"b": 1.0})
    with pytest.raises(ParityAssertionError, match="shapes differ"):
        assert_close(torch.zeros(2, 3), torch.zeros(3, 2))
    # at rtol=atol=0.01 the max rule allows 0.01 around 1.0, torch's additive rule 0.02
    assert_close(1.009, 1.0, rtol=0.01, atol=0.01)
    with pytest.raises(ParityAssertionError, match="rule .a - e. <= max"):
        assert_close(1.015, 1.0, rtol=0.01, atol=0.01)
    assert_close(1.015, 1.0, rtol=0.01, atol=0.01, rule="add")
    with pytest.raises(ParityAssertionError, match="rule .a - e. <= atol \\+ rtol"):
        assert_close(1.025, 1.0, rtol=0.01, atol=0.01, rule="add")
    with pytest.raises(ParityAssertionError, match="Non-finite"):
        assert_close(np.array([np.nan, 1.0]), np.array([np.nan, 1.0]))
    assert_close(np.array([np.nan, 1.0]), np.array([np.nan, 1.0]), equal_nan=True)


def test_bfloat16_uses_the_bfloat16_default():
    expected = torch.linspace(1, 2, 50)
    actual = expected.to(torch.bfloat16)
    assert_close(actual, expected)  # bf16 rounding is within the bf16 default
    tol = resolve_tolerance("bfloat16")
    assert tol.source == "default for bfloat16"


def test_profiles_from_pyproject_and_bad_profiles(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.parity]\n[[tool.parity.tolerance]]\ndtype = "bfloat16"\natol = 0.02\nrtol = 0.05\n')
    [entry] = load_profile(pyproject)
    assert (entry.dtype, entry.atol, entry.pattern) == ("bfloat16", 0.02, "**")
    for text, needle in [('[[tolerance]]\npattern = "x"\n', "needs rtol and/or atol"),
                         ('[[tolerance]]\natol = "big"\n', "must be a number"),
                         ('[[tolerance]]\natol = 1\ndtype = "fp8"\n', "unknown dtype"),
                         ('[[tolerance]]\natol = 1\nbackends = "x"\n', "unknown keys"),
                         ('title = "no entries"\n', "no tolerance entries"),
                         ('[[tolerance]\n', "not valid TOML")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(UsageError, match=needle):
            load_profile(bad)


def test_pytest_plugin_applies_the_profile_of_the_platform(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.parity]\n[[tool.parity.tolerance]]\nbackend = "rocm"\npattern = "scores"\natol = 0.006\nrtol = 0.01\n'
        'note = "ROCm 7.2 gfx950 text-vs-text drift"\n')
    (tmp_path / "test_scores.py").write_text(textwrap.dedent("""
        import numpy as np

        def test_scores(parity_tolerance):
            expected = np.array([0.1, 0.62])
            parity_tolerance.assert_close(expected + 0.0055, expected, name="scores")
    """))

    def pytest_run(*args):
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    on_rocm = pytest_run("--parity-backend", "rocm")
    assert on_rocm.returncode == 0, on_rocm.stdout
    elsewhere = pytest_run()
    assert elsewhere.returncode == 1
    assert "default for float64" in elsewhere.stdout and "Mismatched elements: 2 / 2" in elsewhere.stdout
    verbose = pytest_run("--parity-backend", "rocm", "-v")
    assert "parity: backend=rocm profile=" in verbose.stdout


def test_a_failing_assert_close_under_pytest_shows_the_message_not_parity_frames(tmp_path):
    import subprocess
    import sys

    (tmp_path / "test_user.py").write_text(
        "import numpy as np\n"
        "from parity.testing import assert_close\n"
        "def test_values():\n"
        "    assert_close(np.array([1.0, 2.0]), np.array([1.0, 2.5]), name='scores')\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 1
    assert "Mismatched elements: 1 / 2" in result.stdout
    assert "_compare_leaf" not in result.stdout and "def _walk" not in result.stdout
