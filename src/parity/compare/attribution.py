"""Whom to blame for the first divergence, from the dumps alone (no replay).

With the capture's opt-in input and parameter records (``parity.capture(..., inputs=True,
parameters=True)``, ``parity diff --inputs --parameters``) a dump says, for each tapped module,
what it received and what weights it held. At the first divergence this module gives one of:

- ``parameters``: the first divergence is a parameter fingerprint: the module's weights differ
  (beyond rounding to the lower dtype) — a checkpoint or conversion problem, not a kernel's;
- ``between taps``: the first divergence is a module's *input* while every earlier tap agrees:
  the difference arises in code no tap covers, between the previous tapped output and this
  module (a functional op: the residual add, rotary, a cast);
- ``module``: the first divergence is a module's output, and its recorded inputs and parameter
  fingerprints agree (msprobe's rule: blame a module only when its inputs and parameters
  agree). When the inputs agree within tolerance but are not equal, the module is blamed only if
  its output's relative L2 error is more than :data:`~parity.compare.verdict.JUMP` (4) times its
  inputs' worst — otherwise ``inherited``: it passes on (and may amplify by less than 4x) what
  it received;
- ``unchecked``: neither inputs nor parameters were recorded for that module (the text says how
  to record them).

This is the dump-only counterpart of ``parity explain``'s replay (which needs a model it can
reload; vLLM and imported dumps have none).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from parity.compare.result import Outcome
from parity.compare.verdict import JUMP

_ROLE_PART = re.compile(r"\.(input\.\d+|kwargs\.[^.]+|parameters\.).*$")


def module_of(outcome: Outcome) -> str:
    """The module an outcome belongs to: the name without ``.input.K…``, ``.kwargs.KEY…``,
    ``.parameters.…`` and without a repeat suffix ``#k``."""
    name = outcome.name.split("#", 1)[0]
    return _ROLE_PART.sub("", name) if outcome.role else name


def _rel(o: Outcome) -> float:
    return o.metrics.rel_l2 if o.metrics is not None else (o.stats_rel_l2 or 0.0)


def attribute(outcomes: Sequence[Outcome], first: int) -> dict[str, Any] | None:
    """The attribution of the first divergence ``outcomes[first]`` (see module docstring), or
    None when the run records no inputs or parameters at all."""
    if not any(o.role in ("input", "parameter") for o in outcomes):
        return None
    o = outcomes[first]
    module = module_of(o)
    if o.role == "parameter":
        return {"verdict": "parameters", "module": module,
                "text": f"the weights of {module} differ — {o.name}: {o.reason}"}
    same_call = [x for x in outcomes if x.step == o.step and x.rank == o.rank and module_of(x) == module]
    inputs = [x for x in same_call if x.role == "input"]
    parameters = [x for x in outcomes if x.role == "parameter" and module_of(x) == module]
    if o.role == "input":
        earlier = [x for x in outcomes[:first] if x.step == o.step and x.rank == o.rank and x.role is None]
        after = f"the previous tap ({earlier[-1].name})" if earlier else "the start of the step"
        return {"verdict": "between taps", "module": module,
                "text": (f"the input {o.name} of {module} already differs while every earlier tap agrees: the "
                         f"difference arises in untapped code between {after} and {module}")}
    if not inputs and not parameters:
        return {"verdict": "unchecked", "module": module,
                "text": f"no inputs or parameters of {module} were recorded: capture with inputs and parameters "
                        "(--inputs --parameters) to tell its own error from what it received"}
    bad_params = [x.name for x in parameters if not x.ok]
    if bad_params:
        return {"verdict": "parameters", "module": module,
                "text": f"the weights of {module} differ: {', '.join(bad_params)}"}
    if not inputs:
        return {"verdict": "unchecked", "module": module, "parameters": len(parameters),
                "text": (f"the {len(parameters)} parameters of {module} hold the same weights; its inputs were not "
                         "recorded (--inputs), so its own error cannot be told from what it received")}
    checked = f"{len(inputs)} input{'s' if len(inputs) != 1 else ''}" + (
        f", {len(parameters)} parameter{'s' if len(parameters) != 1 else ''} with the same weights"
        if parameters else ", no parameters recorded")
    worst_input = max(inputs, key=_rel)
    input_error = _rel(worst_input)
    output_error = _rel(o)
    result: dict[str, Any] = {"module": module, "inputs": len(inputs), "parameters": len(parameters),
                              "input_rel_l2": input_error, "output_rel_l2": output_error}
    if input_error > 0 and output_error <= JUMP * input_error:
        result.update(verdict="inherited", text=(
            f"{module} passes on what it received: its inputs agree within tolerance but not exactly "
            f"(worst {worst_input.name}, rel L2 {input_error:.3g}) and its output's rel L2 {output_error:.3g} is "
            f"within {JUMP:g}x of that ({checked})"))
    else:
        how = "equal" if input_error == 0 else f"rel L2 {input_error:.3g}, its output's {output_error:.3g}"
        result.update(verdict="module", text=f"{module} is blamed: its inputs agree ({how}; {checked}) and "
                                              "its output does not")
    return result
