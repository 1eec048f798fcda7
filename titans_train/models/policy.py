"""Optimizer and init policy, declared by the module that owns a parameter.

- ``no_weight_decay(module, *names)``: the module's own parameters ``names`` are learned states,
  not weights (persistent tokens, MAC's memory queries, the memory's M_0): no weight decay.
  ``engine.param_groups`` reads ``module._no_weight_decay``; vectors (norms, biases) never decay.
- ``residual_proj(linear)``: a projection into the residual stream, initialised with std / sqrt(2
  x depth) (GPT-2); ``TitansLM.reset_parameters`` reads ``linear._residual_proj``.

Module attributes, not attributes on the nn.Parameter: a parameter's own attributes are lost by
``copy.deepcopy`` and by ``.to("meta")`` (a new Parameter), a module's are not.
"""

from __future__ import annotations

import torch.nn as nn


def no_weight_decay(module: nn.Module, *names: str) -> None:
    for name in names:
        if name not in module._parameters:
            raise AttributeError(f"{type(module).__name__} has no parameter {name!r}")
    module._no_weight_decay = (*getattr(module, "_no_weight_decay", ()), *names)


def residual_proj(linear: nn.Linear) -> nn.Linear:
    linear._residual_proj = True
    return linear


def takes_weight_decay(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """``param`` is ``module``'s own parameter ``name``."""
    return param.ndim >= 2 and name not in getattr(module, "_no_weight_decay", ())
