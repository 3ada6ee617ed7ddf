"""Which parameters TracIn differentiates: resolving ``layers`` to layer handlers."""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Dict, List, Sequence, Tuple, Union

from torch import nn

from ..errors import TracInError, UnsupportedModuleError
from ..layers import LayerHandler, handler_for

LayerSpec = Union[str, int, Sequence[str]]


def parameterised_modules(model: nn.Module) -> List[Tuple[str, nn.Module, List[str]]]:
    """(name, module, trainable direct parameter names) for every module owning trainable
    parameters, in registration order."""
    found = []
    for name, module in model.named_modules():
        names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if names:
            found.append((name, module, names))
    return found


def _select(found: List[Tuple[str, nn.Module, List[str]]], layers: LayerSpec) -> List[Tuple[str, nn.Module, List[str]]]:
    if isinstance(layers, bool):
        raise TracInError(f"layers={layers!r} is not a layer selection; use 'all', 'last', an int N or a list of module names.")
    if isinstance(layers, int):
        if not 1 <= layers <= len(found):
            raise TracInError(f"layers={layers} asks for the last {layers} parameterised modules but the model has {len(found)}; use 1..{len(found)}.")
        return found[-layers:]
    if layers == "all":
        return found
    if layers == "last":
        return found[-1:]
    if layers == "output_bias":
        name, module, names = found[-1]
        if "bias" not in names:
            raise TracInError(f"layers='output_bias' needs a trainable bias on the last parameterised module, and {name or 'the model'} "
                              "has none; choose layers by module or parameter name instead.")
        return [(name, module, ["bias"])]
    patterns = [layers] if isinstance(layers, str) else list(layers)
    if not patterns:
        raise TracInError("layers is an empty list; name at least one module (or use 'all' / 'last').")
    chosen: Dict[str, List[str]] = {}  # module name -> its parameters in scope
    for pattern in patterns:
        hits = [
            (name, names) for name, _, names in found
            if name == pattern or fnmatchcase(name, pattern) or name.startswith(pattern + ".")
        ]
        if not hits:  # a parameter's own name (e.g. "fc.bias"): that parameter alone
            hits = [(name, [p for p in names if _matches_parameter(name, p, pattern)]) for name, _, names in found]
            hits = [(name, names) for name, names in hits if names]
        if not hits:
            names = ", ".join(n for n, _, _ in found[:12]) + (" ..." if len(found) > 12 else "")
            raise TracInError(f"Layer {pattern!r} matches no module or parameter that requires grad; choose from: {names} "
                              "(or a parameter of one, such as its .bias).")
        for name, names in hits:
            chosen.setdefault(name, [])
            chosen[name] += [p for p in names if p not in chosen[name]]
    return [(name, module, [p for p in names if p in chosen[name]]) for name, module, names in found if name in chosen]


def _matches_parameter(module_name: str, param: str, pattern: str) -> bool:
    full = f"{module_name}.{param}" if module_name else param
    return full == pattern or fnmatchcase(full, pattern)


def resolve_layers(model: nn.Module, layers: LayerSpec = "all") -> List[LayerHandler]:
    """Handlers for the modules selected by ``layers``.

    ``layers`` is ``"all"``, ``"last"`` (the last parameterised module in registration order),
    ``"output_bias"`` (that module's bias alone: when it produces the model's outputs, its per-example
    gradient is the loss gradient at the outputs), an int N (the last N), or module names / glob
    patterns (a name also selects the modules inside it).
    A name or pattern that matches no module is matched against parameter names (``"fc.bias"``,
    ``"*.bias"``): only those parameters of their modules are then in scope.
    Raises :class:`UnsupportedModuleError` for a selected module without an exact kernel, and for
    parameters shared between modules (tied weights), whose cross terms no per-module kernel sees.
    """
    found = parameterised_modules(model)
    if not found:
        raise TracInError("The model has no parameters that require grad; unfreeze the layers to score.")
    selected = _select(found, layers)
    owners: Dict[int, str] = {}
    for name, module, names in found:
        for pname in names:
            param = getattr(module, pname)
            if id(param) in owners and owners[id(param)] != name:
                if any(name == s[0] or owners[id(param)] == s[0] for s in selected):
                    raise UnsupportedModuleError(
                        f"Parameter {name}.{pname} is shared with {owners[id(param)]} (tied weights); exact per-module kernels "
                        "cannot score a shared parameter yet: exclude both modules from layers or untie them."
                    )
            owners.setdefault(id(param), name)
    return [handler_for(name, module, names) for name, module, names in selected]


def kfac_layers(model: nn.Module) -> List[str]:
    """Names of the model's modules K-FAC covers (Linear, Conv), for ``layers=`` when ``"all"`` would
    include others (e.g. batch norm)."""
    return [h.name for h in resolve_layers(model, "all") if h.kronecker]
