"""nn.RNN, nn.GRU and nn.LSTM: each layer and direction applies two Linear maps over time, so per-example gradients
are sums over time of outer products, rebuilt from the module's own output gradients by backpropagation through time.

For layer l and direction d the input map gives ``gi = x W_ih^T + b_ih`` [B, T, G H] for every step at once, and the
hidden map ``gh_t = h_{t-1} W_hh^T + b_hh`` step by step (G = 1, 3, 4 gates for RNN, GRU, LSTM). The example's
gradient of ``W_ih`` is ``sum_t dgi_t^T x_t``, of ``W_hh`` ``sum_t dgh_t^T h_{t-1}``, and the biases' the sums of those
gate gradients; ``dgh_t = dgi_t`` except in a GRU's new gate ``tanh(n_i + r * n_h)``, where it is ``r_t`` times it.

The module runs natively, forward and backward, as in any training step; capture records its inputs and the gradients
at its outputs (the output sequence, h_n and, for an LSTM, c_n). From those, with no autograd, the handler recomputes
each layer's states (the top layer's hidden states are the module's output; the layers below are run again, step by
step) and the gate activations (one matrix product over all steps), then backpropagates through time itself,
step by step, to the gate gradients of every layer and direction, and materialises the per-example gradients with one
batched product per map. The engine checks on the first batch that they sum to autograd's gradient.

Not covered (the parameters then take the exact per-example path): packed sequences, unbatched inputs, LSTM
projections (``proj_size``), and dropout between layers while training.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import Call, LayerHandler, Recorded, Rerun
from .factors import Materialised

NAME = re.compile(r"(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")


@dataclass
class Pass:
    """One forward call: its input x [B, T, in] (batch-first), initial states h0 (and c0) [L * D, B, H], and the
    gradients at its outputs: the output sequence [B, T, D * H], h_n and c_n [L * D, B, H] (zeros where unused)."""

    x: torch.Tensor
    h0: torch.Tensor
    c0: Optional[torch.Tensor]
    out: torch.Tensor  # the output sequence itself [B, T, D * H]
    d_out: torch.Tensor
    d_hn: torch.Tensor
    d_cn: Optional[torch.Tensor]


@dataclass
class Direction:
    """One layer and direction's forward quantities, [B, T, ...] in time order: its inputs x, the states each step
    started from, and the coefficients that turn the gradient at a step's hidden (and cell) state into its gates'."""

    x: torch.Tensor
    starts: torch.Tensor  # h_{t-1}
    to_gi: torch.Tensor  # [B, T, G H]: d gi_t = v_t * to_gi_t, v_t = the step's state gradient repeated over the gates
    to_gh: Optional[torch.Tensor]  # GRU: the hidden map's own (its new gate is r times gi's); else d gh = d gi
    keep_h: Optional[torch.Tensor]  # GRU: z_t, the share of h_{t-1} passed on directly
    to_c: Optional[torch.Tensor]  # LSTM: o_t (1 - tanh^2 c_t), from the hidden state's gradient to the cell state's
    keep_c: Optional[torch.Tensor]  # LSTM: f_t


def _step(mode: str, pre: torch.Tensor, h: torch.Tensor, c: Optional[torch.Tensor], w_hh: torch.Tensor,
          b_hh: Optional[torch.Tensor]):
    """One step of one layer and direction from its input-map gates ``pre`` [B, G H]: the new hidden state [B, H] and
    the cell state (an LSTM's, else None)."""
    gh = F.linear(h, w_hh, b_hh)
    if mode == "GRU":
        ri, zi, ni = pre.chunk(3, dim=-1)
        rh, zh, nh = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
        return torch.lerp(torch.tanh(ni + r * nh), h, z), None
    gates = pre + gh
    if mode == "LSTM":
        i, f, _, o = gates.sigmoid().chunk(4, dim=-1)
        c = torch.addcmul(f * c, i, gates.chunk(4, dim=-1)[2].tanh())
        return o * c.tanh(), c
    return (gates.tanh() if mode == "RNN_TANH" else gates.relu()), None


def _started(states: torch.Tensor, first: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The states [B, T, H] each step started from, given each step's own ``states`` [B, T, H] in time order: the
    previous step's (the next one's when ``reverse``), ``first`` [B, H] for the step that starts the direction."""
    if reverse:
        return torch.cat([states[:, 1:], first.unsqueeze(1)], dim=1)
    return torch.cat([first.unsqueeze(1), states[:, :-1]], dim=1)


class RecurrentHandler(Materialised, LayerHandler):
    """Every weight and bias of an ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``, materialised per example (module docstring).
    A call records the module's inputs with one of its outputs: ``part`` 0 the output sequence, 1 h_n, 2 c_n."""

    module_types = (nn.RNN, nn.GRU, nn.LSTM)
    capture = "rerun"  # the module's own outputs are recorded: nothing is recomputed

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, cls.module_types) and not getattr(module, "proj_size", 0)

    def rerun(self, args: Tuple, kwargs: Dict[str, Any], output: Any) -> Optional[Rerun]:
        rnn = self.module
        given = {**dict(zip(("input", "hx"), args)), **kwargs}
        x, hx = given.get("input"), given.get("hx")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or (rnn.training and rnn.dropout > 0):
            return None  # packed sequences, unbatched inputs, dropout while training
        sequence, state = output
        finals = list(state) if rnn.mode == "LSTM" else [state]
        hx = tuple(t.detach() for t in hx) if isinstance(hx, (tuple, list)) else hx
        kept = (x, hx, sequence.detach().clone())  # the outputs as they are now (a later in-place change cannot touch them)
        seq_rows = 0 if rnn.batch_first else 1
        return Rerun(None, [Recorded(kept, sequence, 0, seq_rows)] + [Recorded(kept, t, 1 + i, 1) for i, t in enumerate(finals)])

    # -- one forward call, rebuilt ----------------------------------------------------------------------------------
    def _passes(self, calls: List[Call]) -> List[Pass]:
        """The recorded calls grouped by forward call (each starts with its output sequence), batch-first."""
        rnn, passes = self.module, []
        groups: List[Dict[int, Call]] = []
        for call in calls:
            if call.part == 0:
                groups.append({})
            groups[-1][call.part] = call
        dirs = 2 if rnn.bidirectional else 1
        for group in groups:
            x, hx, out = group[0].args
            x = (x if rnn.batch_first else x.transpose(0, 1)).to(rnn.weight_ih_l0.dtype)
            out = (out if rnn.batch_first else out.transpose(0, 1)).to(x.dtype)
            zeros = x.new_zeros(rnn.num_layers * dirs, x.shape[0], rnn.hidden_size)
            h0, c0 = (hx if hx is not None else (zeros, zeros)) if rnn.mode == "LSTM" else (hx if hx is not None else zeros, None)
            grads = {p: (c.delta if c.delta is not None else x.new_zeros(c.output_shape)) for p, c in group.items()}
            d_out = grads[0] if rnn.batch_first else grads[0].transpose(0, 1)
            passes.append(Pass(x, h0.to(x.dtype), None if c0 is None else c0.to(x.dtype), out, d_out.to(x.dtype),
                               grads[1].to(x.dtype), grads[2].to(x.dtype) if 2 in grads else None))
        return passes

    def _weights(self, layer: int, d: int):
        suffix = f"_l{layer}" + ("_reverse" if d else "")
        rnn = self.module
        biases = (getattr(rnn, "bias_ih" + suffix), getattr(rnn, "bias_hh" + suffix)) if rnn.bias else (None, None)
        return getattr(rnn, "weight_ih" + suffix), getattr(rnn, "weight_hh" + suffix), biases[0], biases[1]

    def _forward(self, x: torch.Tensor, layer: int, d: int, h0: torch.Tensor, c0: Optional[torch.Tensor],
                 known: Optional[torch.Tensor]) -> Tuple[Direction, torch.Tensor]:
        """One layer and direction's :class:`Direction` over x [B, T, in] and its outputs [B, T, H] (``known``: the
        module's own, for the top layer; else run again step by step)."""
        mode, reverse = self.module.mode, bool(d)
        w_ih, w_hh, b_ih, b_hh = self._weights(layer, d)
        gi = F.linear(x, w_ih, b_ih)
        T = x.shape[1]
        order = range(T - 1, -1, -1) if reverse else range(T)
        hs: List[torch.Tensor] = [h0] * T
        cells: List[torch.Tensor] = [h0] * T
        if known is None:
            h, c = h0, c0
            for t in order:
                h, c = _step(mode, gi[:, t], h, c, w_hh, b_hh)
                hs[t] = h
                cells[t] = c if c is not None else h
        out = torch.stack(hs, 1) if known is None else known
        starts = _started(out, h0, reverse)
        gh = F.linear(starts, w_hh, b_hh)
        if mode == "LSTM" and known is not None:  # the cell states are not among the outputs: a scan over the gates
            i, f, g, _ = (gi + gh).chunk(4, dim=-1)
            i, f, g = i.sigmoid(), f.sigmoid(), g.tanh()
            c = c0
            for t in order:
                c = torch.addcmul(f[:, t] * c, i[:, t], g[:, t])
                cells[t] = c
        return _coefficients(mode, (x, starts, gi, gh, out), cells, c0, reverse), out

    def _gate_gradients(self, p: Pass) -> Dict[Tuple[int, int], Tuple[Direction, torch.Tensor, torch.Tensor]]:
        """{(layer, direction): (its Direction, gate gradients of the input map and of the hidden map [B, T, G H])}."""
        rnn = self.module
        dirs, H = (2 if rnn.bidirectional else 1), rnn.hidden_size
        x, states = p.x, []
        for layer in range(rnn.num_layers):
            here, outs = [], []
            for d in range(dirs):
                m = layer * dirs + d
                known = p.out[..., d * H:(d + 1) * H] if layer == rnn.num_layers - 1 else None
                direction, out = self._forward(x, layer, d, p.h0[m], None if p.c0 is None else p.c0[m], known)
                here.append(direction)
                outs.append(out)
            states.append(here)
            x = torch.cat(outs, dim=-1) if dirs > 1 else outs[0]
        result, d_out = {}, p.d_out
        for layer in reversed(range(rnn.num_layers)):
            d_x = None
            for d in range(dirs):
                m = layer * dirs + d
                w_ih, w_hh, _, _ = self._weights(layer, d)
                finals = (p.d_hn[m], None if p.d_cn is None else p.d_cn[m])
                dgi, dgh = _backprop(states[layer][d], d_out[..., d * H:(d + 1) * H], finals, w_hh, bool(d))
                result[(layer, d)] = (states[layer][d], dgi, dgh)
                d_x = dgi @ w_ih if d_x is None else d_x + dgi @ w_ih
            d_out = d_x
        return result

    # -- the kernel -------------------------------------------------------------------------------------------------
    def per_example(self, calls: List[Call]) -> List[torch.Tensor]:
        dirs = 2 if self.module.bidirectional else 1
        totals: List[Optional[torch.Tensor]] = [None] * len(self.param_names)
        for p in self._passes(calls):
            gates = self._gate_gradients(p)
            for i, name in enumerate(self.param_names):
                kind, which, layer, reverse = NAME.match(name).groups()  # type: ignore[union-attr]
                direction, dgi, dgh = gates[(int(layer), int(bool(reverse)) if dirs > 1 else 0)]
                D, A = (dgi, direction.x) if which == "ih" else (dgh, direction.starts)
                grads = (D.transpose(1, 2) @ A if kind == "weight" else D.sum(1)).reshape(D.shape[0], -1)
                totals[i] = grads if totals[i] is None else totals[i] + grads
        return [t for t in totals if t is not None]


def _coefficients(mode: str, tensors: Tuple[torch.Tensor, ...], cells: List[torch.Tensor], c0: Optional[torch.Tensor],
                  reverse: bool) -> Direction:
    """The :class:`Direction` of one layer and direction from its inputs x, starting states, input- and hidden-map
    gates gi, gh [B, T, G H], outputs [B, T, H] and (LSTM) cell states in time order."""
    x, starts, gi, gh, out = tensors
    if mode == "LSTM":
        c = torch.stack(cells, 1)
        c_prev = _started(c, c0, reverse)  # type: ignore[arg-type]
        i, f, g, o = (gi + gh).chunk(4, dim=-1)
        i, f, g, o, tc = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid(), c.tanh()
        to_gi = torch.cat([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g), tc * o * (1 - o)], dim=-1)
        return Direction(x, starts, to_gi, None, None, o * (1 - tc * tc), f)
    if mode == "GRU":
        ri, zi, ni = gi.chunk(3, dim=-1)
        rh, zh, nh = gh.chunk(3, dim=-1)
        r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
        n = torch.tanh(ni + r * nh)
        kn, kz = (1 - z) * (1 - n * n), (starts - n) * z * (1 - z)
        kr = kn * nh * r * (1 - r)
        return Direction(x, starts, torch.cat([kr, kz, kn], -1), torch.cat([kr, kz, kn * r], -1), z, None, None)
    slope = 1 - out * out if mode == "RNN_TANH" else (out > 0).to(out.dtype)
    return Direction(x, starts, slope, None, None, None, None)


def _backprop(direction: Direction, d_out: torch.Tensor, finals: Tuple[torch.Tensor, Optional[torch.Tensor]],
              w_hh: torch.Tensor, reverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backpropagation through time for one layer and direction: from the gradients at its outputs d_out [B, T, H] and
    at its final states, the gate gradients of its input and hidden maps [B, T, G H] (written step by step into
    buffers viewed as [B, T, G, H], each gate block the step's state gradient times its coefficients)."""
    B, T, H = d_out.shape
    to_gi = direction.to_gi.view(B, T, -1, H)
    to_gh = to_gi if direction.to_gh is None else direction.to_gh.view(B, T, -1, H)
    gi = torch.empty_like(to_gi)
    gh = gi if direction.to_gh is None else torch.empty_like(to_gh)
    carry_h, carry_c = finals
    for t in (range(T) if reverse else range(T - 1, -1, -1)):
        dh = d_out[:, t] + carry_h
        if direction.to_c is not None:  # LSTM: gates i, f, g from the cell state's gradient, o from the hidden state's
            dc = torch.addcmul(carry_c, dh, direction.to_c[:, t]) if carry_c is not None else dh * direction.to_c[:, t]
            torch.mul(dc.unsqueeze(1), to_gi[:, t, :3], out=gi[:, t, :3])
            torch.mul(dh, to_gi[:, t, 3], out=gi[:, t, 3])
            carry_c = dc * direction.keep_c[:, t]  # type: ignore[index]
        else:
            torch.mul(dh.unsqueeze(1), to_gi[:, t], out=gi[:, t])
            if direction.to_gh is not None:
                torch.mul(dh.unsqueeze(1), to_gh[:, t], out=gh[:, t])
        carry_h = gh[:, t].reshape(B, -1) @ w_hh
        if direction.keep_h is not None:  # GRU: h_t = (1 - z) n + z h_{t-1}
            carry_h = torch.addcmul(carry_h, dh, direction.keep_h[:, t])
    return gi.view(B, T, -1), gh.view(B, T, -1)
