"""nn.RNN, nn.GRU and nn.LSTM: each layer and direction applies two Linear maps over time, so per-example gradients
are sums over time of outer products, recorded by recomputing the module's forward during capture.

For layer l and direction d the input map gives ``gi = x W_ih^T + b_ih`` [B, T, G H] at once for every step, and the
hidden map ``gh_t = h_{t-1} W_hh^T + b_hh`` [B, G H] step by step (G = 1, 3, 4 gates for RNN, GRU, LSTM). The example's
gradient of ``W_ih`` is ``sum_t dgi_t^T x_t`` and of ``W_hh`` ``sum_t dgh_t^T h_{t-1}``; the biases' are the sums of
the output gradients. The native kernels keep ``gi``, ``gh`` and ``h_{t-1}`` inside, so during capture the handler
recomputes the forward with the module's own parameters, step by step, recording ``gi`` (once per layer and direction)
with the states each step started from; the engine checks that the recomputed output equals the module's and uses it
instead. ``dgh_t`` needs no recording of its own: the gates add ``gi_t + gh_t``, so it equals ``dgi_t``, except in a
GRU's new gate ``tanh(n_i + r * n_h)``, where it is ``r_t`` times it (the reset gates are kept from the forward). The
per-example gradients are then materialised with one batched product per map (the cost of the forward's own matrix
products).

Not covered (the parameters then take the exact per-example path): packed sequences, unbatched inputs, LSTM
projections (``proj_size``), and dropout between layers while training.
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import Call, LayerHandler, Recorded, Rerun, zero_delta_like
from .factors import Materialised

NAME = re.compile(r"(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")
HiddenMap = Tuple[torch.Tensor, Optional[torch.Tensor]]  # W_hh [G H, H] and b_hh [G H] (None: none, or folded into gi)


def _step(mode: str, pre: torch.Tensor, h: torch.Tensor, c: Optional[torch.Tensor], hidden: HiddenMap):
    """One step of one layer and direction from its input-map gates ``pre`` [B, G H] (an LSTM's and an RNN's already
    carry b_hh): the new hidden state [B, H], the cell state (an LSTM's, else None) and the reset gate (a GRU's, else
    None)."""
    weight, bias = hidden
    if mode == "GRU":
        ri, zi, ni = pre.chunk(3, dim=-1)
        rh, zh, nh = F.linear(h, weight, bias).chunk(3, dim=-1)
        r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
        n = torch.tanh(ni + r * nh)
        return torch.lerp(n, h, z), None, r  # (1 - z) n + z h
    gates = torch.addmm(pre, h, weight.t())
    if mode == "LSTM":
        i, f, _, o = gates.sigmoid().chunk(4, dim=-1)
        c = torch.addcmul(f * c, i, gates.chunk(4, dim=-1)[2].tanh())
        return o * c.tanh(), c, None
    return (gates.tanh() if mode == "RNN_TANH" else gates.relu()), None, None


class RecurrentHandler(Materialised, LayerHandler):
    """Every weight and bias of an ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``, materialised per example. One call per layer
    and direction, ``Call.part = l * directions + d``."""

    module_types = (nn.RNN, nn.GRU, nn.LSTM)
    capture = "rerun"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.module_types) and not getattr(module, "proj_size", 0)

    # -- the recomputed forward ------------------------------------------------------------------------------------
    def rerun(self, args: Tuple, kwargs: Dict[str, Any]) -> Optional[Rerun]:
        rnn = self.module
        given = dict(zip(("input", "hx"), args), **kwargs)
        x, hx = given["input"], given.get("hx")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or (rnn.training and rnn.dropout > 0):
            return None  # packed sequences, unbatched inputs, dropout while training
        x = x if rnn.batch_first else x.transpose(0, 1)  # [B, T, in]
        dirs = 2 if rnn.bidirectional else 1
        h0, c0 = self._initial(hx, x, dirs)
        parts: List[Recorded] = []
        finals_h, finals_c = [], []
        for layer in range(rnn.num_layers):
            outs = []
            for d in range(dirs):
                m = layer * dirs + d
                out, h, c = self._direction(x, layer, d, h0[m], None if c0 is None else c0[m], parts)
                outs.append(out)
                finals_h.append(h)
                finals_c.append(c)
            x = torch.cat(outs, dim=-1) if dirs > 1 else outs[0]
        output = x if rnn.batch_first else x.transpose(0, 1)
        h_n = torch.stack(finals_h)
        state = (h_n, torch.stack(finals_c)) if rnn.mode == "LSTM" else h_n
        return Rerun((output, state), parts)

    def _initial(self, hx: Any, x: torch.Tensor, dirs: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """h0 [L * dirs, B, H] (and c0 for an LSTM): the given ones, or zeros."""
        rnn = self.module
        zeros = x.new_zeros(rnn.num_layers * dirs, x.shape[0], rnn.hidden_size)
        if rnn.mode == "LSTM":
            return (hx[0], hx[1]) if hx is not None else (zeros, zeros)
        return (hx if hx is not None else zeros), None

    def _direction(self, x: torch.Tensor, layer: int, d: int, h: torch.Tensor, c: Optional[torch.Tensor],
                   parts: List[Recorded]):
        """One layer and direction over x [B, T, in]: its outputs [B, T, H] and final states. Recorded: the input map's
        output gi [B, T, G H] with x, the hidden states each step started from [B, T, H] and, for a GRU, the reset gates
        [B, T, H]; the gradient at gi gives both maps' (the hidden map's gate gradients are gi's, the GRU's new-gate
        block times r)."""
        rnn, suffix = self.module, f"_l{layer}" + ("_reverse" if d else "")
        w_ih, w_hh = getattr(rnn, "weight_ih" + suffix), getattr(rnn, "weight_hh" + suffix)
        b_ih, b_hh = (getattr(rnn, "bias_ih" + suffix), getattr(rnn, "bias_hh" + suffix)) if rnn.bias else (None, None)
        gi = F.linear(x, w_ih, b_ih)  # [B, T, G H]
        folded = rnn.mode != "GRU" and b_hh is not None  # the gates add b_hh to gi: once for every step
        steps = (gi + b_hh if folded else gi).unbind(1)
        order = range(len(steps) - 1, -1, -1) if d else range(len(steps))
        outs: List[torch.Tensor] = [h] * len(steps)
        starts: List[torch.Tensor] = [h] * len(steps)
        resets: List[Optional[torch.Tensor]] = [None] * len(steps)
        hidden = (w_hh, None if folded else b_hh)
        for t in order:
            starts[t] = h
            h, c, resets[t] = _step(rnn.mode, steps[t], h, c, hidden)
            outs[t] = h
        reset = torch.stack(resets, 1).detach() if rnn.mode == "GRU" else None  # type: ignore[arg-type]
        m = layer * (2 if rnn.bidirectional else 1) + d
        parts.append(Recorded((x, torch.stack(starts, 1).detach(), reset), gi, m))
        return torch.stack(outs, dim=1), h, c

    # -- the kernels ------------------------------------------------------------------------------------------------
    def _maps(self, calls: List[Call]) -> Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor]]:
        """{(layer-direction, "ih" or "hh"): (inputs A [B, T, in or H], output gradients D [B, T, G H])}."""
        maps = {}
        for call in calls:
            x, starts, reset = call.args
            D = call.delta if call.delta is not None else zero_delta_like(call, x)
            hidden = D
            if reset is not None:  # GRU: n = tanh(n_i + r * n_h), so the hidden map's new-gate gradient is r times gi's
                r_block, z_block, n_block = D.chunk(3, dim=-1)
                hidden = torch.cat([r_block, z_block, n_block * reset], dim=-1)
            maps[(call.part, "ih")], maps[(call.part, "hh")] = (x, D), (starts, hidden)
        return maps

    def per_example(self, calls: List[Call]) -> List[torch.Tensor]:
        maps = self._maps(calls)
        dirs = 2 if self.module.bidirectional else 1
        out = []
        for name in self.param_names:
            kind, which, layer, reverse = NAME.match(name).groups()  # type: ignore[union-attr]
            A, D = maps[(int(layer) * dirs + int(bool(reverse)), which)]
            grads = D.transpose(1, 2) @ A if kind == "weight" else D.sum(1)
            out.append(grads.reshape(grads.shape[0], -1))
        return out
