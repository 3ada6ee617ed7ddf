"""Which parameters TracIn differentiates: resolving ``layers`` to layer handlers."""
from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from ..errors import TracInError
from ..layers import LayerHandler, handler_for
from ..layers.broadcast import BroadcastParameterHandler, broadcastable
from ..layers.exact import ExactHandler
from ..layers.tied import TiedHandler

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


def resolve_layers(model: nn.Module, layers: LayerSpec = "all", exclude: Sequence[str] = ()) -> List[LayerHandler]:
    """Handlers for the parameters selected by ``layers`` less those matching ``exclude``.

    ``layers`` is ``"all"``, ``"last"`` (the last parameterised module in registration order),
    ``"output_bias"`` (that module's bias alone: when it produces the model's outputs, its per-example
    gradient is the loss gradient at the outputs), an int N (the last N), or module names / glob
    patterns (a name also selects the modules inside it).
    A name or pattern that matches no module is matched against parameter names (``"fc.bias"``,
    ``"*.bias"``): only those parameters of their modules are then in scope. ``exclude`` takes the same
    kinds of names and patterns and removes what they match.
    Raw [1, ...] parameters of a module without a handler get the broadcast kernel, parameters shared between modules
    (tied weights: every use counts) the tied kernel when every use has a handler; the parameters of modules without a
    per-module kernel (custom modules) and the other raw parameters go to one
    :class:`~tracin.layers.exact.ExactHandler`, scored by per-example backward passes. Raises :class:`UnsupportedModuleError` for a selected module whose per-example gradients
    are not defined (it couples the examples of a batch).
    """
    found = parameterised_modules(model)
    if not found:
        raise TracInError("The model has no parameters that require grad; unfreeze the layers to score.")
    selected = _excluded(_select(found, layers), exclude)
    tied = _tied(found, selected)
    handlers: List[LayerHandler] = []
    exact: List[str] = []
    for first in dict.fromkeys(tied.values()):  # each shared parameter once, by its first use
        shared = _tied_handler(model, [n for n, f in tied.items() if f == first])
        handlers += [shared] if shared is not None else []
        exact += [first] if shared is None else []
    for name, module, names in selected:
        own = [p for p in names if _full(name, p) not in tied]
        if not own:
            continue
        handler = handler_for(name, module, own)
        if handler is None:  # raw parameters: those broadcast over the batch get their kernel, the rest go exact
            broadcast = [p for p in own if broadcastable(module.get_parameter(p))]
            handlers += [BroadcastParameterHandler(name, module, broadcast)] if broadcast else []
            exact += [_full(name, p) for p in own if p not in broadcast]
        else:
            handlers.append(handler)
    return handlers + ([ExactHandler(model, exact)] if exact else [])


def _tied_handler(model: nn.Module, names: List[str]) -> Optional[LayerHandler]:
    """A kernel for a parameter shared under ``names`` (full names, first use first): each use's module handler scoring
    it alone, when every use has one whose gradients are laid out as the parameter is; else None (exact passes)."""
    handlers = []
    for full in names:
        module_name, _, param = full.rpartition(".")
        handler = handler_for(module_name, model.get_submodule(module_name), [param])
        if handler is None or not handler.shares_layout or handler.capture != "output":
            return None
        handlers.append(handler)
    return TiedHandler(handlers)


def _full(module_name: str, param: str) -> str:
    return f"{module_name}.{param}" if module_name else param


def _excluded(selected: List[Tuple[str, nn.Module, List[str]]], exclude: Sequence[str]) -> List[Tuple[str, nn.Module, List[str]]]:
    """``selected`` less the modules and parameters that ``exclude``'s names or glob patterns match."""
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    if not patterns:
        return selected
    def hits(p: str, name: str, names: List[str]) -> bool:
        return name == p or fnmatchcase(name, p) or name.startswith(p + ".") or any(_matches_parameter(name, n, p) for n in names)

    idle = [p for p in patterns if not any(hits(p, name, names) for name, _, names in selected)]
    if idle:
        shown = ", ".join(name for name, _, _ in selected[:8]) + (" ..." if len(selected) > 8 else "")
        raise TracInError(f"exclude pattern {idle[0]!r} matches nothing in the layers in scope ({shown}), so it would "
                          "change nothing; fix the pattern or drop it.")
    kept = []
    for name, module, names in selected:
        module_out = any(name == p or fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)
        left = [] if module_out else [n for n in names if not any(_matches_parameter(name, n, p) for p in patterns)]
        if left:
            kept.append((name, module, left))
    if not kept:
        raise TracInError(f"exclude={patterns} leaves no parameter in scope; exclude less.")
    return kept


def _tied(found: List[Tuple[str, nn.Module, List[str]]], selected: List[Tuple[str, nn.Module, List[str]]]) -> Dict[str, str]:
    """{full name of each use of a parameter shared between modules: the full name of its first use}, for the
    shared parameters that a selected module uses (their uses are summed, so they are scored once, exactly)."""
    uses: Dict[int, List[str]] = {}
    for name, module, names in found:
        for p in names:
            uses.setdefault(id(getattr(module, p)), []).append(_full(name, p))
    chosen = {_full(name, p) for name, _, names in selected for p in names}
    tied: Dict[str, str] = {}
    for names in uses.values():
        if len(names) > 1 and any(n in chosen for n in names):
            tied.update({n: names[0] for n in names})
    return tied


def kfac_layers(model: nn.Module) -> List[str]:
    """Names of the model's modules K-FAC covers (Linear, Conv), for ``layers=`` when ``"all"`` would
    include others (e.g. batch norm)."""
    return [h.name for h in resolve_layers(model, "all") if h.kronecker]


def scope_rows(handlers: Sequence[LayerHandler], modes: Dict[str, Optional[str]]) -> List[Dict[str, object]]:
    """One row per handler: name, type, parameter count, the kernel ``modes`` names for it, the parameters in scope,
    and whether they are all of the module's trainable ones."""
    return [
        {"name": h.name, "type": "parameters" if not h.hooked else type(h.module).__name__, "params": h.num_params,
         "kernel": modes.get(h.name) or ("exact" if not h.hooked else None), "parameters": list(h.param_names),
         "whole": not h.hooked or set(h.param_names) == {n for n, p in h.module.named_parameters(recurse=False) if p.requires_grad}}
        for h in handlers
    ]
