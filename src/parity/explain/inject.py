"""``parity inject``: how does noise at one tap propagate? (incident 5's sensitivity experiment)

Seeded Gaussian noise is added to the output of every module matching ``--tap`` during a run of
one model, and compared with the clean run of the same model:

- **error vs depth** (teacher-forced on the clean sequence — prompt plus the clean greedy
  continuation — so positions line up): relative L2 error of every default tap, worst per layer;
- **logits**: mean KL(clean ‖ noisy) of the next-token distributions over all positions, and
  top-1 agreement;
- **generated tokens**: greedy generation of ``new_tokens`` tokens with the noise active; token
  match rate against the clean generation (position by position) and the first divergent
  position per prompt.

Noise: ``scale`` is the standard deviation (absolute), or with ``relative=True`` a multiple of
the tensor's RMS at each call. The generator is seeded once (``seed``, default 0), so a run is
reproducible. ``--tap kv`` is a shorthand for the key and value projections of every attention
(``re:.*\\.(k_proj|v_proj)$``): noise in what the KV cache stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from parity.capturing.memory import collect_outputs
from parity.capturing.taps import compile_tap, layer_of
from parity.errors import UsageError

KV_PATTERN = r"re:.*\.(k_proj|v_proj)$"


@dataclass
class InjectionResult:
    """Propagation of injected noise; JSON-ready through :meth:`to_json`."""

    tap: str
    modules: list[str]
    scale: float
    relative: bool
    seed: int
    by_layer: list[dict[str, Any]] = field(default_factory=list)
    by_tap: dict[str, float] = field(default_factory=dict)
    kl_mean: float = 0.0
    top1_agreement: float = 1.0
    token_match_rate: float = 1.0
    first_divergent_positions: list[int | None] = field(default_factory=list)
    generated: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {k: v for k, v in self.__dict__.items()}


def _noise_hook(generator: torch.Generator, scale: float, relative: bool):
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        tensor = output[0] if isinstance(output, tuple) else output
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            return None
        sigma = scale * (float(tensor.detach().float().pow(2).mean().sqrt()) if relative else 1.0)
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32).to(tensor.dtype) * sigma
        noisy = tensor + noise.to(tensor.device)
        return (noisy, *output[1:]) if isinstance(output, tuple) else noisy
    return hook


def _kl(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    lp, lq = log_softmax(clean), log_softmax(noisy)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def inject(loaded: Any, prompts: Sequence[str], *, tap: str, scale: float, relative: bool = False, seed: int = 0,
           new_tokens: int = 24, progress: Callable[[int, int], None] | None = None) -> InjectionResult:
    """Run the experiment on ``loaded`` (a :class:`parity.backends.hf.LoadedModel`)."""
    if not scale >= 0:
        raise UsageError(f"--scale must be >= 0, got {scale}")
    pattern = KV_PATTERN if tap == "kv" else tap
    matcher = compile_tap(pattern)
    model, tok = loaded.model, loaded.tokenizer
    targets = [n for n, _ in model.named_modules() if n and matcher.matches(n)]
    if not targets:
        raise UsageError(f"--tap {tap!r} matches no module of the model",
                         hint="see `parity inspect` of a dump for module names, or use --tap kv")
    modules = dict(model.named_modules())
    result = InjectionResult(tap=tap, modules=targets, scale=scale, relative=relative, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    worst: dict[str, float] = {}
    kls, agree, matches, total = [], [], 0, 0
    for index, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt").input_ids.to(loaded.spec.device)
        with torch.inference_mode():
            clean_seq = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                       pad_token_id=tok.pad_token_id or 0)
        clean = collect_outputs(model, input_ids=clean_seq, use_cache=False)
        handles = [modules[n].register_forward_hook(_noise_hook(generator, scale, relative)) for n in targets]
        try:
            noisy = collect_outputs(model, input_ids=clean_seq, use_cache=False)
            with torch.inference_mode():
                noisy_seq = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                                           pad_token_id=tok.pad_token_id or 0)
        finally:
            for handle in handles:
                handle.remove()
        for name, ref in clean.items():
            out = noisy[name]
            norm = float(np.linalg.norm(ref))
            err = float(np.linalg.norm(out - ref)) / norm if norm > 0 else 0.0
            worst[name] = max(worst.get(name, 0.0), err)
        logits_name = next((n for n in clean if n.endswith("lm_head")), None)
        if logits_name is not None:
            c, n = clean[logits_name].reshape(-1, clean[logits_name].shape[-1]), noisy[logits_name].reshape(
                -1, noisy[logits_name].shape[-1])
            kls.extend(_kl(c, n).tolist())
            agree.extend((c.argmax(-1) == n.argmax(-1)).tolist())
        gen_clean = clean_seq[0, ids.shape[1]:].tolist()
        gen_noisy = noisy_seq[0, ids.shape[1]:].tolist()
        length = max(len(gen_clean), len(gen_noisy))
        same = [i < len(gen_clean) and i < len(gen_noisy) and gen_clean[i] == gen_noisy[i] for i in range(length)]
        matches += sum(same)
        total += length
        result.first_divergent_positions.append(next((i for i, s in enumerate(same) if not s), None))
        result.generated.append({"prompt": prompt, "clean": tok.decode(gen_clean), "noisy": tok.decode(gen_noisy)})
        if progress is not None:
            progress(index + 1, len(prompts))
    result.by_tap = worst
    layers: dict[int, tuple[float, str]] = {}
    for name, err in worst.items():
        layer = layer_of(name)
        if layer is not None and err >= layers.get(layer, (-1.0, ""))[0]:
            layers[layer] = (err, name)
    result.by_layer = [{"layer": k, "rel_l2": v[0], "worst_tap": v[1]} for k, v in sorted(layers.items())]
    result.kl_mean = float(np.mean(kls)) if kls else 0.0
    result.top1_agreement = float(np.mean(agree)) if agree else 1.0
    result.token_match_rate = matches / total if total else 1.0
    return result


def render_injection(result: InjectionResult, console: Any) -> None:
    """Print error vs depth, logits KL, top-1 agreement and token match rate."""
    from rich import box
    from rich.table import Table

    from parity.report.terminal import g

    kind = f"{result.scale:g} x RMS" if result.relative else f"sigma {result.scale:g}"
    console.print(f"noise: Gaussian, {kind}, seed {result.seed}, into {len(result.modules)} module(s) "
                  f"matching {result.tap!r}")
    table = Table(title="error vs depth (rel L2 against the clean run, teacher-forced)", box=box.SIMPLE_HEAD,
                  title_justify="left", pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in ("layer", "rel L2", "", "worst tap"):
        table.add_column(col, justify="right" if col in ("layer", "rel L2") else "left", overflow="fold")
    top = max((row["rel_l2"] for row in result.by_layer), default=0.0)
    for row in result.by_layer:
        bar = "#" * (int(round(30 * row["rel_l2"] / top)) if top > 0 else 0)
        table.add_row(str(row["layer"]), g(row["rel_l2"]), bar, row["worst_tap"])
    console.print(table)
    console.print(f"logits: mean KL(clean || noisy) {g(result.kl_mean)}, top-1 agreement "
                  f"{100 * result.top1_agreement:.1f}%")
    console.print(f"generation: token match rate {100 * result.token_match_rate:.1f}% "
                  f"(token divergence {100 * (1 - result.token_match_rate):.1f}%); first divergent position "
                  f"per prompt: {', '.join('-' if p is None else str(p) for p in result.first_divergent_positions)}")
