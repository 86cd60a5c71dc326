"""Gradient rules for the ONNX recurrent ops GRU and LSTM: backward through time, unrolled.

The forward stays the fused ``GRU``/``LSTM`` op (onnxruntime's kernel is fast); the rule asks it for
its full hidden-state sequence Y and recomputes every gate activation from Y in parallel over time
(the previous hidden state of step t is Y[t-1], so one Gemm covers all steps). Only the gradient
recurrence itself is sequential: it is unrolled over the static sequence length T with one MatMul
by R and a few elementwise ops per step, and the weight gradients are then single Gemms over all
T*N rows. Supported: layout 0, forward/reverse/bidirectional, default activations, no clip, no
sequence_lens, GRU with either linear_before_reset, LSTM without peepholes or input_forget.

ONNX gate orders: GRU z, r, h (torch's r, z, n reordered by the exporter); LSTM i, o, f, c.
W is [D, G*H, I], R [D, G*H, H], B [D, 2*G*H] = (Wb, Rb); Y [T, D, N, H]; Y_h, Y_c [D, N, H].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import onnx
from onnx import helper

from aggregator.compiler.emitter import Emitter
from aggregator.compiler.grad_context import GradContext, node_attrs, rule

DEFAULT_ACTIVATIONS = {"GRU": ["Sigmoid", "Tanh"], "LSTM": ["Sigmoid", "Tanh", "Tanh"]}
GATES = {"GRU": 3, "LSTM": 4}


@dataclass
class Direction:
    """One direction's tensors, with the time axis already in processing order."""

    x: str  # [T, N, I]
    y: str  # [T, N, H] hidden states h_0 .. h_{T-1}
    w: str  # [G*H, I]
    r: str  # [G*H, H]
    wb: str | None  # [G*H]
    rb: str | None  # [G*H]
    h0: str  # [1, N, H]
    c0: str | None  # [1, N, H] (LSTM)
    dy: str | None  # [T, N, H]
    dh_last: str | None  # [1, N, H]
    dc_last: str | None  # [1, N, H] (LSTM)
    reverse: bool


@dataclass
class DirectionGrads:
    dx: str  # [T, N, I] in processing order
    dw: str  # [G*H, I]
    dr: str  # [G*H, H]
    db: str  # [2*G*H]
    dh0: str  # [1, N, H]
    dc0: str | None = None


def _slice(em: Emitter, x: str, start: int, end: int, axis: int, step: int | None = None) -> str:
    inputs = [x, em.ints([start]), em.ints([end]), em.ints([axis])]
    if step is not None:
        inputs.append(em.ints([step]))
    return em.node("Slice", inputs)


def _reverse_time(em: Emitter, x: str, steps: int) -> str:
    return _slice(em, x, steps - 1, -steps - 1, 0, step=-1)


def _split_time(em: Emitter, x: str, steps: int) -> list[str]:
    """[T, ...] -> T tensors [1, ...]."""
    if steps == 1:
        return [x]
    return em.node("Split", [x, em.ints([1] * steps)], n_outputs=steps, axis=0)


def _zeros_like(em: Emitter, x: str) -> str:
    return em.node("ConstantOfShape", [em.node("Shape", [x])],
                   value=helper.make_tensor("zero", em.onnx_dtype, [1], [0.0]))


def _one_minus(em: Emitter, x: str) -> str:
    return em.sub(em.scalar(1.0), x)


def _check_attrs(ctx: GradContext, node: onnx.NodeProto) -> dict:
    attrs = node_attrs(node)
    if int(attrs.get("layout", 0)) != 0:
        raise ctx.unsupported(node, "layout=1 (export with the default time-major layout)")
    if "clip" in attrs:
        raise ctx.unsupported(node, "cell clipping (clip)")
    directions = 2 if _direction(attrs) == "bidirectional" else 1
    activations = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])]
    if activations and activations != DEFAULT_ACTIVATIONS[node.op_type] * directions:
        raise ctx.unsupported(node, f"activations {activations} (only the defaults)")
    if len(node.input) > 4 and node.input[4]:
        raise ctx.unsupported(node, "sequence_lens (pad to a static length and drop the lengths input)")
    if node.op_type == "LSTM":
        if len(node.input) > 7 and node.input[7]:
            raise ctx.unsupported(node, "peephole weights P")
        if int(attrs.get("input_forget", 0)):
            raise ctx.unsupported(node, "input_forget=1")
    return attrs


def _direction(attrs: dict) -> str:
    value = attrs.get("direction", b"forward")
    return value.decode() if isinstance(value, bytes) else value


def _hidden_sequence(ctx: GradContext, node: onnx.NodeProto) -> str:
    """The node's Y output, asking the forward op to produce it when the model does not use it."""
    if node.output and node.output[0]:
        return node.output[0]
    if node.output[0] in ctx.em.forward_rewrites:  # rewrites are keyed by the first output, here ""
        raise ctx.unsupported(node, "two recurrent nodes that both leave their Y output unnamed")
    y = ctx.em.fresh(f"{node.name or node.op_type}_Y")
    rewritten = onnx.NodeProto()
    rewritten.CopyFrom(node)
    rewritten.output[0] = y
    ctx.em.forward_rewrites[node.output[0]] = rewritten
    return y


def _directions(ctx: GradContext, node: onnx.NodeProto, grads: list, steps: int, hidden: int,
                x_size: int) -> list[Direction]:
    em = ctx.em
    attrs = node_attrs(node)
    direction = _direction(attrs)
    count = 2 if direction == "bidirectional" else 1
    x, w, r = node.input[:3]
    b = node.input[3] if len(node.input) > 3 else ""
    h0 = node.input[5] if len(node.input) > 5 else ""
    c0 = node.input[6] if node.op_type == "LSTM" and len(node.input) > 6 else ""
    gh = GATES[node.op_type] * hidden
    y = _hidden_sequence(ctx, node)
    dy, dh, dc = (list(grads) + [None, None, None])[:3]

    def pick(value: str | None, d: int, axis: int) -> str | None:
        if not value:
            return None
        return value if count == 1 else _slice(em, value, d, d + 1, axis)

    out = []
    for d in range(count):
        reverse = direction == "reverse" or d == 1
        xd, yd = x, em.reshape(pick(y, d, 1), [steps, -1, hidden])
        dyd = em.reshape(pick(dy, d, 1), [steps, -1, hidden]) if dy else None
        if reverse:
            xd, yd = _reverse_time(em, xd, steps), _reverse_time(em, yd, steps)
            dyd = _reverse_time(em, dyd, steps) if dyd else None
        bd = em.reshape(pick(b, d, 0), [2 * gh]) if b else None
        zeros = None if (h0 and (c0 or node.op_type == "GRU")) else _zeros_like(em, _slice(em, yd, 0, 1, 0))
        out.append(Direction(
            x=xd, y=yd,
            w=em.reshape(pick(w, d, 0), [gh, x_size]),
            r=em.reshape(pick(r, d, 0), [gh, hidden]),
            wb=_slice(em, bd, 0, gh, 0) if bd else None,
            rb=_slice(em, bd, gh, 2 * gh, 0) if bd else None,
            h0=pick(h0, d, 0) or zeros,
            c0=(pick(c0, d, 0) or zeros) if node.op_type == "LSTM" else None,
            dy=dyd,
            dh_last=pick(dh, d, 0),
            dc_last=pick(dc, d, 0) if node.op_type == "LSTM" else None,
            reverse=reverse,
        ))
    return out


def _previous(em: Emitter, first: str, sequence: str, steps: int) -> str:
    """[first, sequence[0], ..., sequence[T-2]]: the state each step starts from."""
    if steps == 1:
        return first
    return em.node("Concat", [first, _slice(em, sequence, 0, steps - 1, 0)], axis=0)


def _gemm(em: Emitter, a: str, b: str, bias: str | None, **attrs) -> str:
    return em.node("Gemm", [a, b] + ([bias] if bias else []), **attrs)


def _cols(em: Emitter, x: str, start: int, end: int) -> str:
    return _slice(em, x, start, end, 1)


def _per_step(em: Emitter, x: str, steps: int, shape: Sequence[int]) -> list[str]:
    """A [T*N, k] tensor as T tensors of ``shape`` (with -1 for N)."""
    return _split_time(em, em.reshape(x, [steps] + list(shape)), steps)


def _weight_grads(em: Emitter, d: Direction, da_x: str, da_h: str | None, hp2: str, x2: str, steps: int,
                  x_size: int, dr: str | None = None) -> tuple[str, str, str, str]:
    """dW, dR, dB and dX from the pre-activation gradients of all steps ([T*N, G*H] each)."""
    dw = em.node("Gemm", [da_x, x2], transA=1)
    if dr is None:
        dr = em.node("Gemm", [da_h, hp2], transA=1)
    dwb = em.reduce("ReduceSum", da_x, [0], keepdims=False)
    drb = dwb if da_h is None else em.reduce("ReduceSum", da_h, [0], keepdims=False)
    db = em.node("Concat", [dwb, drb], axis=0)
    dx = em.reshape(em.node("MatMul", [da_x, d.w]), [steps, -1, x_size])
    return dw, dr, db, dx


def _sum(em: Emitter, parts: Sequence[str | None]) -> str | None:
    present = [p for p in parts if p]
    if not present:
        return None
    return present[0] if len(present) == 1 else em.node("Sum", present)


def _gru_direction(em: Emitter, d: Direction, steps: int, hidden: int, x_size: int, lbr: bool) -> DirectionGrads:
    """h = (1 - z) * n + z * h_prev with z, r = sigmoid(.), n = tanh(x Wh + Wbh + r * (h_prev Rh + Rbh))
    (linear_before_reset) or tanh(x Wh + Wbh + (r * h_prev) Rh + Rbh)."""
    h = hidden
    x2 = em.reshape(d.x, [-1, x_size])
    hp2 = em.reshape(_previous(em, d.h0, d.y, steps), [-1, h])
    xa = _gemm(em, x2, d.w, d.wb, transB=1)  # [TN, 3H]
    r_zr = _slice(em, d.r, 0, 2 * h, 0)
    r_h = _slice(em, d.r, 2 * h, 3 * h, 0)
    rb_zr = _slice(em, d.rb, 0, 2 * h, 0) if d.rb else None
    rb_h = _slice(em, d.rb, 2 * h, 3 * h, 0) if d.rb else None
    zr = em.node("Sigmoid", [em.add(_cols(em, xa, 0, 2 * h), _gemm(em, hp2, r_zr, rb_zr, transB=1))])
    z, r = _cols(em, zr, 0, h), _cols(em, zr, h, 2 * h)
    if lbr:
        q = _gemm(em, hp2, r_h, rb_h, transB=1)  # h_prev Rh + Rbh
        n = em.node("Tanh", [em.add(_cols(em, xa, 2 * h, 3 * h), em.mul(r, q))])
    else:
        s = em.mul(r, hp2)
        n = em.node("Tanh", [em.add(_cols(em, xa, 2 * h, 3 * h), _gemm(em, s, r_h, rb_h, transB=1))])
    one_minus_z = _one_minus(em, z)
    cz = em.mul(em.mul(em.sub(hp2, n), z), one_minus_z)  # d a_z / d h
    cn = em.mul(one_minus_z, _one_minus(em, em.mul(n, n)))  # d a_n / d h
    dsig_r = em.mul(r, _one_minus(em, r))
    z_t = _per_step(em, z, steps, [-1, h])
    dy_t = _split_time(em, d.dy, steps) if d.dy else [None] * steps
    dhs: list[str] = [""] * steps
    carry = d.dh_last
    if lbr:
        cq = em.mul(cn, r)
        cr = em.mul(em.mul(cn, q), dsig_r)
        coeff_t = _per_step(em, em.node("Concat", [cz, cr, cq], axis=1), steps, [-1, 3, h])
        for t in reversed(range(steps)):
            dh = _sum(em, [dy_t[t], carry])
            dhs[t] = dh
            da = em.reshape(em.mul(em.unsqueeze(dh, [2]), coeff_t[t]), [1, -1, 3 * h])
            carry = em.add(em.node("MatMul", [da, d.r]), em.mul(dh, z_t[t]))
        dh_all = em.reshape(em.node("Concat", dhs, axis=0) if steps > 1 else dhs[0], [-1, h])
        da_z, da_r, da_n = em.mul(dh_all, cz), em.mul(dh_all, cr), em.mul(dh_all, cn)
        da_x = em.node("Concat", [da_z, da_r, da_n], axis=1)
        da_h = em.node("Concat", [da_z, da_r, em.mul(dh_all, cq)], axis=1)
        dw, dr, db, dx = _weight_grads(em, d, da_x, da_h, hp2, x2, steps, x_size)
    else:
        crp = em.mul(hp2, dsig_r)
        cn_t, cz_t = _per_step(em, cn, steps, [-1, h]), _per_step(em, cz, steps, [-1, h])
        crp_t, r_t = _per_step(em, crp, steps, [-1, h]), _per_step(em, r, steps, [-1, h])
        for t in reversed(range(steps)):
            dh = _sum(em, [dy_t[t], carry])
            dhs[t] = dh
            ds = em.node("MatMul", [em.mul(dh, cn_t[t]), r_h])  # d (r * h_prev)
            da_zr = em.node("Concat", [em.mul(dh, cz_t[t]), em.mul(ds, crp_t[t])], axis=2)
            carry = _sum(em, [em.mul(dh, z_t[t]), em.mul(ds, r_t[t]), em.node("MatMul", [da_zr, r_zr])])
        dh_all = em.reshape(em.node("Concat", dhs, axis=0) if steps > 1 else dhs[0], [-1, h])
        da_n = em.mul(dh_all, cn)
        ds_all = em.node("MatMul", [da_n, r_h])
        da_zr = em.node("Concat", [em.mul(dh_all, cz), em.mul(ds_all, crp)], axis=1)
        da_x = em.node("Concat", [da_zr, da_n], axis=1)
        dr = em.node("Concat", [em.node("Gemm", [da_zr, hp2], transA=1), em.node("Gemm", [da_n, s], transA=1)],
                     axis=0)
        dw, dr, db, dx = _weight_grads(em, d, da_x, None, hp2, x2, steps, x_size, dr=dr)
    return DirectionGrads(dx=dx, dw=dw, dr=dr, db=db, dh0=carry)


def _lstm_direction(em: Emitter, d: Direction, steps: int, hidden: int, x_size: int) -> DirectionGrads:
    """i, o, f = sigmoid(.), g = tanh(.); c = f * c_prev + i * g; h = o * tanh(c). The cell states are
    recomputed with one Mul and one Add per step from the gates, which need only Y."""
    h = hidden
    x2 = em.reshape(d.x, [-1, x_size])
    hp2 = em.reshape(_previous(em, d.h0, d.y, steps), [-1, h])
    a = em.add(_gemm(em, x2, d.w, d.wb, transB=1), _gemm(em, hp2, d.r, d.rb, transB=1))  # [TN, 4H]
    iof = em.node("Sigmoid", [_cols(em, a, 0, 3 * h)])
    i, o, f = _cols(em, iof, 0, h), _cols(em, iof, h, 2 * h), _cols(em, iof, 2 * h, 3 * h)
    g = em.node("Tanh", [_cols(em, a, 3 * h, 4 * h)])
    f_t = _per_step(em, f, steps, [-1, h])
    ig_t = _per_step(em, em.mul(i, g), steps, [-1, h])
    cells, c = [], d.c0
    for t in range(steps):
        c = em.add(em.mul(f_t[t], c), ig_t[t])
        cells.append(c)
    c_all = em.node("Concat", cells, axis=0) if steps > 1 else cells[0]
    cp2 = em.reshape(_previous(em, d.c0, c_all, steps), [-1, h])
    tc = em.node("Tanh", [em.reshape(c_all, [-1, h])])
    oc_t = _per_step(em, em.mul(o, _one_minus(em, em.mul(tc, tc))), steps, [-1, h])  # dc/dh through h = o*tanh(c)
    k = em.node("Concat", [
        em.mul(g, em.mul(i, _one_minus(em, i))),  # a_i, times dc
        em.mul(tc, em.mul(o, _one_minus(em, o))),  # a_o, times dh
        em.mul(cp2, em.mul(f, _one_minus(em, f))),  # a_f, times dc
        em.mul(i, _one_minus(em, em.mul(g, g))),  # a_c, times dc
    ], axis=1)
    k_t = _per_step(em, k, steps, [-1, 4, h])
    dy_t = _split_time(em, d.dy, steps) if d.dy else [None] * steps
    das: list[str] = [""] * steps
    dh_carry, dc_carry = d.dh_last, d.dc_last
    for t in reversed(range(steps)):
        dh = _sum(em, [dy_t[t], dh_carry])
        dc = _sum(em, [dc_carry, em.mul(dh, oc_t[t])])
        udc, udh = em.unsqueeze(dc, [2]), em.unsqueeze(dh, [2])
        da = em.mul(em.node("Concat", [udc, udh, udc, udc], axis=2), k_t[t])
        das[t] = em.reshape(da, [1, -1, 4 * h])
        dh_carry = em.node("MatMul", [das[t], d.r])
        dc_carry = em.mul(dc, f_t[t])
    da_all = em.reshape(em.node("Concat", das, axis=0) if steps > 1 else das[0], [-1, 4 * h])
    dw, dr, db, dx = _weight_grads(em, d, da_all, da_all, hp2, x2, steps, x_size)
    return DirectionGrads(dx=dx, dw=dw, dr=dr, db=db, dh0=dh_carry, dc0=dc_carry)


def _stack(em: Emitter, parts: list[str], shape: Sequence[int]) -> str:
    """Per-direction gradients -> one [D, *shape] tensor."""
    parts = [em.reshape(p, [1] + list(shape)) for p in parts]
    return parts[0] if len(parts) == 1 else em.node("Concat", parts, axis=0)


def _recurrent_grad(ctx: GradContext, node: onnx.NodeProto, grads: list) -> list:
    attrs = _check_attrs(ctx, node)
    em = ctx.em
    x_shape = ctx.shape(node, node.input[0])
    steps, hidden = x_shape[0], int(attrs["hidden_size"])
    if steps is None or x_shape[2] is None:
        raise ctx.unsupported(node, f"a dynamic sequence length or feature size (X is {x_shape}); export with a "
                                    "fixed sequence length")
    x_size = int(x_shape[2])
    results = []
    for d in _directions(ctx, node, grads, steps, hidden, x_size):
        if node.op_type == "GRU":
            lbr = bool(int(attrs.get("linear_before_reset", 0)))
            res = _gru_direction(em, d, steps, hidden, x_size, lbr)
        else:
            res = _lstm_direction(em, d, steps, hidden, x_size)
        if d.reverse:
            res.dx = _reverse_time(em, res.dx, steps)
        results.append(res)
    gh = GATES[node.op_type] * hidden
    out: list[str | None] = [None] * len(node.input)
    names = list(node.input)
    if ctx.needs(names[0]):
        out[0] = _sum(em, [r.dx for r in results])
    if ctx.needs(names[1]):
        out[1] = _stack(em, [r.dw for r in results], [gh, x_size])
    if ctx.needs(names[2]):
        out[2] = _stack(em, [r.dr for r in results], [gh, hidden])
    if len(names) > 3 and ctx.needs(names[3]):
        out[3] = _stack(em, [r.db for r in results], [2 * gh])
    if len(names) > 5 and ctx.needs(names[5]):
        out[5] = _stack(em, [r.dh0 for r in results], [-1, hidden])
    if len(names) > 6 and node.op_type == "LSTM" and ctx.needs(names[6]):
        out[6] = _stack(em, [r.dc0 for r in results], [-1, hidden])
    return out


@rule("GRU")
def gru_grad(ctx: GradContext, node, grads):
    return _recurrent_grad(ctx, node, grads)


@rule("LSTM")
def lstm_grad(ctx: GradContext, node, grads):
    return _recurrent_grad(ctx, node, grads)
