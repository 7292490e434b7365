r"""Numba kernels of the recurrence: one layer, one direction, the whole sequence per call.

The time loop runs here, in compiled code. Shape letters as in ``fastrnn.contract.rnn``.

Per step (forward)::

    for each thread's share of the hidden units, in groups of UNIT_GROUP units:
        for each tile of up to MR active rows:
            S[MR, gates, units] = h_{t-1}[rows] @ W_hh^T[:, those units' gate columns]   (tile_gemm)
            fused cell step on S + xw_t + b_hh for those rows and units                  (*_fwd_units)

so each unit's gate pre-activations are turned into the new state while they are still in
L1, and a thread only ever reads the part of ``W_hh`` that belongs to its own units (which
stays in its core's L2 from one step to the next). Backward is the same with ``W_hh`` not
transposed: ``dh_{t-1}[rows, units] = grad_gates_t[rows] @ W_hh[:, units]``, then the fused
cell backward for those units. A step is one parallel region (two with a projection ``W_hr``);
small steps run on one thread.

``tile_gemm`` is a register-blocked GEMM micro-kernel written directly in LLVM IR (an
``@intrinsic``): MR rows x NV vectors of accumulators (24 AVX-512 registers), one broadcast
and NV vector FMAs per row and k; it runs at about 235 GF/s on one core here, the FMA peak.
Numba cannot express that with loops (LLVM does not keep a local accumulator array in
registers), and scipy's BLAS, the obvious alternative, measured 76-94 GF/s on the per-step
shapes (it re-packs ``W_hh`` on every call, and this machine pins it to its AVX2 kernels with
``OPENBLAS_CORETYPE=Haswell``), 5 GF/s at batch 1. The weights are packed once per call into
panels ``[P, K, NV*L]`` (L = lanes, see ``pack_panel``). ``gemm`` runs the op code's big GEMMs
(input projection, grad_x, weight gradients) on the same micro-kernel and threads.

Variants (docs/variants.md: layer norm, peephole, recurrent dropout, zoneout, resets, GRU
reset_after=False) run in the same two kernels, ``rnn_forward`` / ``rnn_backward``: their last
argument ``var`` is None for the plain cell, else a tuple of the variant's arrays (``VAR``
below). Numba compiles one version per type of ``var`` and decides every ``var is None`` at
compile time, so the plain version is the plain code alone. A layer norm needs a row's whole
product before any gate, so a variant step is a few phases (see the variant section); the cell
equations are written once, in the ``*_fwd_units`` / ``*_bwd_units`` helpers that both inline.

Kernel arguments are numpy arrays (zero-copy views of torch tensors), all C-contiguous, all of
one float dtype (float32 or float64: one compiled signature each, and one more per dtype for
the variants). Absent optional inputs are empty arrays of the right rank, so that every call
of a kernel has the same types.

Numerics
--------
- float32: sigmoid and tanh are computed by ``exp_f32`` (attention's algorithm too: range
  reduction to ``[-ln2/2, ln2/2]``, degree-5 minimax polynomial, scale by ``2^k`` built from
  the exponent bits): about 2 ulp, and, unlike libm's ``expf``, a loop of it vectorises (Numba
  has no vector math library without Intel SVML). NaN propagates: every clamp is written so
  that a NaN fails the comparison and passes through unchanged, and no fast-math flag other
  than ``contract`` (fused multiply-add) is used, so the compiler may not assume finite values.
- float64: libm's ``exp`` and ``tanh`` (``gradcheck`` and the 1e-10 tolerance need them).
- sigmoid uses ``1 / (1 + exp(-x))`` (no cancellation; exp's overflow to inf gives 0); tanh
  uses ``(1 - e) / (1 + e)``, ``e = exp(-2|x|)``, and an odd polynomial below ``|x| < 0.25``
  where that form would cancel. Backward reads the derivatives off the saved activations:
  ``d_sigmoid(s) = s (1 - s)``, ``d_tanh(t) = 1 - t^2``.
- The GEMM sums over k in order with fused multiply-adds, one accumulator per output.
"""
from __future__ import annotations

import math

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.core.extending import intrinsic, overload

# jit: numba.njit with fastrnn's on-disk cache (FASTRNN_NUMBA_CACHE, damaged entries rebuilt,
# read-only installs compile in memory): see fastrnn/_numba/runtime.py
from .runtime import CACHE, jit  # noqa: F401  (CACHE: for callers)

# fastmath "contract" only: fused multiply-add, nothing that assumes values are finite.
_JIT = dict(cache=True, nogil=True, fastmath={"contract"}, error_model="numpy")
# Only explicit prange loops run in parallel: Numba would otherwise turn every slice
# assignment inside the time loop into a parallel region of its own.
_JIT_PARALLEL = dict(_JIT, parallel={"prange": True, "comprehension": False, "reduction": False,
                                     "inplace_binop": False, "setitem": False, "numpy": False,
                                     "stencil": False, "fusion": False})

# Small helpers called once per row: inlined into the caller's Numba IR, so that the array
# views passed to them cost no reference counting and no call.
_JIT_INLINE = dict(_JIT, inline="always")
# @overload implementations go through numba's own jit, not runtime.jit: uncached (they are
# one-line lambdas, compiled into each cached caller anyway).
_JIT_OVERLOAD = {k: v for k, v in _JIT.items() if k != "cache"}

LSTM, GRU, RNN_TANH, RNN_RELU = 0, 1, 2, 3
CELL_CODES = {"lstm": LSTM, "gru": GRU, "rnn_tanh": RNN_TANH, "rnn_relu": RNN_RELU}

# Host vector width (the cache is keyed on the host CPU, so baking it in is safe).
VEC_BYTES = 64 if llvm.get_host_cpu_features().get("avx512f") else 32
ACC_VECTORS = 24 if VEC_BYTES == 64 else 8   # accumulator registers the micro-kernel may use
MR3, MR4 = ACC_VECTORS // 3, ACC_VECTORS // 4   # rows per tile for 3 and 4 vectors per row
UNIT_GROUP = 128          # hidden units whose gates one pass keeps in the scratch tile
PAR_MIN_MACS = 1 << 17    # default: multiply-adds per step below which a step runs on one thread


# ---------------------------------------------------------------------------------------------
# GEMM micro-kernel
# ---------------------------------------------------------------------------------------------
@intrinsic
def tile_gemm(typingctx, a, a_off, lda, ldk, mr, w, w_off, ldw, c, c_off, ldc, ldv, K, nv, mr_max):
    """``c[c_off + r*ldc + v*ldv + l] = sum_k a[a_off + r*lda + k*ldk] * w[w_off + k*ldw + v*L + l]``
    for r < mr, v < nv, l < L (L = lanes of one vector register; ``ldw`` is nv*L for a packed
    panel). ``nv`` and ``mr_max`` must be literal integers; ``mr`` (1..mr_max) is a runtime
    value."""
    if not (isinstance(nv, types.IntegerLiteral) and isinstance(mr_max, types.IntegerLiteral)):
        return None
    NV, MR_MAX = nv.literal_value, mr_max.literal_value

    def codegen(context, builder, sig, args):
        fty = context.get_value_type(sig.args[0].dtype)
        esize = 4 if fty == ir.FloatType() else 8
        L = VEC_BYTES // esize
        vty = ir.VectorType(fty, L)
        i64 = ir.IntType(64)
        suffix = f"v{L}{'f32' if fty == ir.FloatType() else 'f64'}"
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty] * 3), f"llvm.fma.{suffix}")
        a_data = context.make_array(sig.args[0])(context, builder, args[0]).data
        w_data = context.make_array(sig.args[5])(context, builder, args[5]).data
        c_data = context.make_array(sig.args[8])(context, builder, args[8]).data
        a_off_, lda_, ldk_, mr_, w_off_, ldw_, c_off_, ldc_, ldv_, K_ = (
            context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2, 3, 4, 6, 7, 9, 10, 11, 12))
        a_ptr = builder.gep(a_data, [a_off_])
        w_ptr = builder.gep(w_data, [w_off_])
        c_ptr = builder.gep(c_data, [c_off_])
        zero = ir.Constant(vty, None)
        splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), L), None)
        const = lambda v: ir.Constant(i64, v)  # noqa: E731
        end = builder.append_basic_block("tile.end")
        switch = builder.switch(mr_, end)

        def fma_step(MR, k, acc):
            """acc[r*NV + v] += a[r, k] * w[k, v] for one k (acc: MR*NV vectors)."""
            w_k = builder.gep(w_ptr, [builder.mul(k, ldw_)])
            # align = element size: panels and rows are only element-aligned
            w_v = [builder.load(builder.bitcast(builder.gep(w_k, [const(v * L)]), vty.as_pointer()), align=esize)
                   for v in range(NV)]
            out = []
            for r in range(MR):
                a_rk = builder.load(builder.gep(a_ptr, [builder.add(builder.mul(const(r), lda_),
                                                                    builder.mul(k, ldk_))]))
                a_vec = builder.shuffle_vector(
                    builder.insert_element(ir.Constant(vty, ir.Undefined), a_rk, ir.Constant(ir.IntType(32), 0)),
                    ir.Constant(vty, ir.Undefined), splat_mask)
                out.extend(builder.call(fma, [a_vec, w_v[v], acc[r * NV + v]]) for v in range(NV))
            return out

        def phis(n, incoming):
            """n vector phis, each fed by (block, list of n values) pairs."""
            ps = [builder.phi(vty) for _ in range(n)]
            for block, values in incoming:
                for p, v in zip(ps, values):
                    p.add_incoming(v, block)
            return ps

        for MR in range(1, MR_MAX + 1):
            # Few accumulators cannot hide the FMA latency: then two sets of them take even and
            # odd k (summed at the end), so that at least 8 independent FMAs are in flight.
            SETS = 2 if MR * NV < 8 else 1
            n = MR * NV
            entry = builder.append_basic_block(f"tile.mr{MR}")
            loop = builder.append_basic_block(f"tile.mr{MR}.loop")
            tail_check = builder.append_basic_block(f"tile.mr{MR}.tailcheck")
            tail = builder.append_basic_block(f"tile.mr{MR}.tail")
            store = builder.append_basic_block(f"tile.mr{MR}.store")
            switch.add_case(ir.Constant(mr_.type, MR), entry)
            builder.position_at_end(entry)
            k_main = builder.sub(K_, builder.srem(K_, const(SETS)))
            builder.cbranch(builder.icmp_signed(">", k_main, const(0)), loop, tail_check)
            builder.position_at_end(loop)
            k = builder.phi(i64)
            k.add_incoming(const(0), entry)
            acc = phis(SETS * n, [(entry, [zero] * (SETS * n))])
            new = []
            for st in range(SETS):
                new.extend(fma_step(MR, builder.add(k, const(st)), acc[st * n:(st + 1) * n]))
            k_next = builder.add(k, const(SETS))
            k.add_incoming(k_next, loop)
            for p, v in zip(acc, new):
                p.add_incoming(v, loop)
            builder.cbranch(builder.icmp_signed("<", k_next, k_main), loop, tail_check)
            builder.position_at_end(tail_check)
            acc = phis(SETS * n, [(entry, [zero] * (SETS * n)), (loop, new)])
            builder.cbranch(builder.icmp_signed("<", k_main, K_), tail, store)
            builder.position_at_end(tail)
            tail_acc = fma_step(MR, k_main, acc[:n]) + acc[n:]
            builder.branch(store)
            builder.position_at_end(store)
            res = phis(SETS * n, [(tail_check, acc), (tail, tail_acc)])
            if SETS == 2:
                res = [builder.fadd(res[i], res[n + i]) for i in range(n)]
            for r in range(MR):
                row = builder.gep(c_ptr, [builder.mul(const(r), ldc_)])
                for v in range(NV):
                    dst = builder.bitcast(builder.gep(row, [builder.mul(const(v), ldv_)]), vty.as_pointer())
                    builder.store(res[r * NV + v], dst, align=esize)
            builder.branch(end)
        builder.position_at_end(end)
        return context.get_dummy_value()

    return types.none(a, a_off, lda, ldk, mr, w, w_off, ldw, c, c_off, ldc, ldv, K, nv, mr_max), codegen


@jit(**_JIT)
def pack_panel(M, trans, gates, units, nv, out, p):
    """Panel p of the weight matrix of ``y = x @ M'`` (``M' = M^T``, or ``M`` if ``trans``),
    packed into ``out [P, K, nv*L]`` (L lanes): row k of a panel holds the nv*L output columns
    that one register tile computes. Plain layout (``gates`` = 1): output column
    ``p*nv*L + v*L + l`` (of ``units``) goes to ``out[p, :, v*L + l]``. Gate layout (``gates`` =
    nv > 1; M' has ``gates * units`` columns, gate-major as torch): unit ``p*L + l`` of gate v
    goes to ``out[p, :, v*L + l]``, so one panel holds every gate of L units. Padding is 0."""
    _, K, width = out.shape
    L = width // nv
    for v in range(nv):
        for l in range(L):
            u = p * L + l if gates > 1 else p * width + v * L + l
            if u >= units:
                for k in range(K):
                    out[p, k, v * L + l] = 0
    if trans:   # M' = M: read rows of M, write rows of the panel
        for k in range(K):
            for v in range(nv):
                for l in range(L):
                    u = p * L + l if gates > 1 else p * width + v * L + l
                    if u < units:
                        out[p, k, v * L + l] = M[k, v * units + u if gates > 1 else u]
    else:       # M' = M^T: read rows of M (one output column each)
        for v in range(nv):
            for l in range(L):
                u = p * L + l if gates > 1 else p * width + v * L + l
                if u < units:
                    n = v * units + u if gates > 1 else u
                    col = v * L + l
                    for k in range(K):
                        out[p, k, col] = M[n, k]

# ---------------------------------------------------------------------------------------------
# Activations and their derivatives. float32: vectorisable polynomial exp; float64: libm.
# ---------------------------------------------------------------------------------------------
@intrinsic
def _f32_bits(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, i):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


_F = np.float32
_ZERO32, _ONE32, _TWO32, _INF32 = _F(0.0), _F(1.0), _F(2.0), _F(np.inf)
_EXP_LO, _EXP_HI = _F(-87.0), _F(88.0)          # 2^k stays a normal float32
_ROUND = _F(12582912.0)                           # 1.5 * 2^23: adding it rounds to an integer
_ROUND_BITS = np.int32(np.array([12582912.0], np.float32).view(np.int32)[0])
_LOG2E = _F(1.4426950408889634)
_LN2_HI, _LN2_LO = _F(0.693359375), _F(-2.12194440e-4)  # ln 2 split so that k * _LN2_HI is exact
# minimax on |r| <= ln2/2 (Cephes' expf): exp(r) ~ 1 + r + r^2 p(r)
_P = (_F(1.9875691500e-4), _F(1.3981999507e-3), _F(8.3334519073e-3), _F(4.1665795894e-2),
      _F(1.6666665459e-1), _F(5.0000001201e-1))
_T3, _T5, _T7, _T9 = _F(-1 / 3), _F(2 / 15), _F(-17 / 315), _F(62 / 2835)
_TANH_SMALL = _F(0.25)


@jit(**_JIT)
def exp_f32(x):
    """exp of a float32, about 2 ulp; exactly 0 below -87 and +inf above 88 (a masked score adds
    nothing, sigmoid's 1 / (1 + inf) is 0); NaN stays NaN (the clamps are comparisons NaN fails)."""
    y = _EXP_LO if x < _EXP_LO else x
    y = _EXP_HI if y > _EXP_HI else y
    t = y * _LOG2E + _ROUND          # k = round(y / ln 2) sits in the low mantissa bits of t
    k = t - _ROUND
    r = y - k * _LN2_HI
    r = r - k * _LN2_LO              # |r| <= ln2 / 2
    p = ((((_P[0] * r + _P[1]) * r + _P[2]) * r + _P[3]) * r + _P[4]) * r + _P[5]
    p = p * r * r + r + _ONE32
    e = p * _bits_f32((_f32_bits(t) - _ROUND_BITS + np.int32(127)) << np.int32(23))
    e = _ZERO32 if x < _EXP_LO else e
    return _INF32 if x > _EXP_HI else e


@jit(**_JIT)
def _sigmoid_f32(x):
    return _ONE32 / (_ONE32 + exp_f32(-x))


@jit(**_JIT)
def _tanh_f32(x):
    a = abs(x)
    e = exp_f32(-_TWO32 * a)
    big = (_ONE32 - e) / (_ONE32 + e)
    if x < 0:
        big = -big
    x2 = x * x
    small = x + x * x2 * (_T3 + x2 * (_T5 + x2 * (_T7 + x2 * _T9)))
    return small if a < _TANH_SMALL else big


@jit(**_JIT)
def _sigmoid_f64(x):
    e = math.exp(-abs(x))            # never overflows
    return 1.0 / (1.0 + e) if x >= 0 else e / (1.0 + e)


def _scalar(name, f32, f64, doc):
    """A scalar function of a float32 or float64 for compiled code only: the one-line lambda ``f32``
    or ``f64``, picked by the argument's type and compiled into each caller (loops of it vectorise)."""
    def stub(x):
        raise NotImplementedError("only callable from numba-compiled code")
    stub.__name__ = stub.__qualname__ = name
    stub.__doc__ = doc
    overload(stub, jit_options=_JIT_OVERLOAD)(lambda x: f32 if x == types.float32 else f64)
    return stub


vexp = _scalar("vexp", lambda x: exp_f32(x), lambda x: math.exp(x), "exp (float32: exp_f32)")
sigmoid = _scalar("sigmoid", lambda x: _sigmoid_f32(x), lambda x: _sigmoid_f64(x), "logistic function")
tanh = _scalar("tanh", lambda x: _tanh_f32(x), lambda x: math.tanh(x), "hyperbolic tangent")
# the derivatives, from the activation's output as backward has it saved
d_sigmoid = _scalar("d_sigmoid", lambda x: x * (_ONE32 - x), lambda x: x * (1.0 - x), "sigmoid' from s: s (1 - s)")
d_tanh = _scalar("d_tanh", lambda x: _ONE32 - x * x, lambda x: 1.0 - x * x, "tanh' from t: 1 - t^2")


# ---------------------------------------------------------------------------------------------
# The cell equations (reference_rnn's docstring), once per cell and direction: fused steps on
# ``nu`` consecutive hidden units ``j = J .. J+nu-1`` of one batch row b, inlined into both step
# structures. The hidden product of gate v of unit j is ``P[rp, v * ldp + up + u]`` (u = j - J):
# the plain step passes its register tile (P = S, rp its row, ldp = UG, up = 0), the variant's
# row phases the whole row (P = A, rp = b, ldp = H, up = J). ``var`` is a literal at each call
# site: False in the plain step, where LLVM folds every option away, True in the variant rows,
# where an option is on when its array (in the tuple ``vo``) is not empty.
# Arguments are whole 2-D arrays with a row index and, for gate rows, ``v * H + j`` column
# offsets. All indices are unsigned: Numba then emits no negative-index wraparound and the
# addresses are affine in the loop index, so LLVM vectorises the loop (row views would cost
# reference counting per call: measured 3-5 instead of 1.5 ns per LSTM unit). Gate outputs go
# to the scratch row ``O`` at constant offsets ``v * UG`` and are copied to the gate-strided
# destination afterwards (``_scatter_gates``): stores into one array at the runtime offsets
# ``v * H`` keep LLVM from vectorising (it cannot rule out that they overlap), which measured
# 11x slower. Forward: pre-activations in, activated gates out. Backward: saved activations
# in, pre-activation gradients out, each activation's derivative taken from its output.
# ---------------------------------------------------------------------------------------------
U = np.uint64
UG, UG2, UG3 = U(UNIT_GROUP), U(2 * UNIT_GROUP), U(3 * UNIT_GROUP)


@jit(**_JIT_INLINE)
def lstm_fwd_units(nu, J, H, b, X, P, rp, ldp, up, bh, C, Hu, O, save, C_out, var, vo):
    """Pre-activations ``X[b, v*H + j] + P[rp, v*ldp + up + u] + bh[v*H + j]`` (xw_t, the hidden
    product, b_hh); C[b]: c_{t-1} in, c_t out; Hu[b] <- o * tanh(c_t). If ``save``: activated
    i, f, g, o -> O, c_t -> C_out[b]. Variant, ``vo = (t, ts, peep, zc, new_seq, cn)``: peephole;
    zoneout (c_t = zc c_{t-1} + (1 - zc) c_new; c_new -> new_seq[ts]); with the cell layer norm
    (cn [B, H] not empty) c_new -> cn[b], and hu is left to the row's layer norm."""
    one = X.dtype.type(1)
    t, ts, peep, zc, new_seq, cn = vo
    has_peep, has_zc, has_lnc = var and peep.shape[0] > 0, var and zc.shape[0] > 0, var and cn.shape[1] > 0
    for u in range(nu):
        j = J + u
        cp = C[b, j]
        pi = X[b, j] + P[rp, up + u] + bh[j]
        pf = X[b, H + j] + P[rp, ldp + up + u] + bh[H + j]
        pg = X[b, H + H + j] + P[rp, ldp + ldp + up + u] + bh[H + H + j]
        po = X[b, H + H + H + j] + P[rp, ldp + ldp + ldp + up + u] + bh[H + H + H + j]
        if has_peep:
            pi += peep[0, j] * cp
            pf += peep[1, j] * cp
        i, f, g = sigmoid(pi), sigmoid(pf), tanh(pg)
        c_new = f * cp + i * g
        if has_peep:
            po += peep[2, j] * c_new
        o = sigmoid(po)
        c_t = c_new
        if has_zc:
            c_t = zc[t, b, j] * cp + (one - zc[t, b, j]) * c_new
            new_seq[ts, b, j] = c_new
        C[b, j] = c_t
        if has_lnc:
            cn[b, j] = c_new
        else:
            Hu[b, j] = o * tanh(c_new)
        if save:
            O[u], O[UG + u], O[UG2 + u], O[UG3 + u] = i, f, g, o
            C_out[b, j] = c_t


@jit(**_JIT_INLINE)
def gru_fwd_units(nu, J, H, b, X, P, rp, ldp, up, bh, Hp, Hn, O, save, HN, var, vo):
    """Hidden product and X as ``lstm_fwd_units``; Hp[b]: h_{t-1}; Hn[b] <- (1 - z) n + z h_{t-1}.
    If ``save``: activated r, z, n -> O, h_n = P_n + b_hn -> HN[b]. Variant reset_after=False,
    ``vo = (h_in, rh)`` with rh [B, H] not empty: r, z only, and rh[b] <- r * h_in[b] (n needs
    (r * h_in) W_hn^T first: ``_gru_n_row``)."""
    one = X.dtype.type(1)
    h_in, rh = vo
    split = var and rh.shape[1] > 0
    for u in range(nu):
        j = J + u
        r = sigmoid(X[b, j] + P[rp, up + u] + bh[j])
        z = sigmoid(X[b, H + j] + P[rp, ldp + up + u] + bh[H + j])
        if split:
            O[u], O[UG + u] = r, z
            rh[b, j] = r * h_in[b, j]
        else:
            h_n = P[rp, ldp + ldp + up + u] + bh[H + H + j]
            n = tanh(X[b, H + H + j] + r * h_n)
            Hn[b, j] = (one - z) * n + z * Hp[b, j]
            if save:
                O[u], O[UG + u], O[UG2 + u] = r, z, n
                HN[b, j] = h_n


@jit(**_JIT_INLINE)
def rnn_fwd_units(relu, nu, J, b, X, P, rp, up, bh, Hn, var, vo):
    """Hn[b, j] <- act(X[b, j] + P[rp, up + u] + bh[j]); relu keeps NaN (a NaN fails ``v < 0``).
    Variant zoneout, ``vo = (ts, new_seq)`` not empty: h_new also -> new_seq[ts, b]."""
    zero = X.dtype.type(0)
    ts, new_seq = vo
    keep = var and new_seq.shape[0] > 0
    for u in range(nu):
        j = J + u
        v = X[b, j] + P[rp, up + u] + bh[j]
        h = (zero if v < zero else v) if relu else tanh(v)
        Hn[b, j] = h
        if keep:
            new_seq[ts, b, j] = h


@jit(**_JIT_INLINE)
def lstm_bwd_units(nu, J, H, b, A, Cn, Cp, bp, D, rd, d0, GS, bs, DC, O, var, vo):
    """A[b]: saved i, f, g, o; Cn[b]: c_new; Cp[bp]: c_{t-1}; ``dhu = D[rd, d0 + u] + GS[bs, j]``:
    the gradient reaching hu = o * tanh(c_new); DC[b]: gradient reaching c_t in, c_{t-1} out;
    O <- d_i, d_f, d_g, d_o. Variant, ``vo = (t, peep, gp, zc, dv, gx)``: zoneout; peephole (its
    gradient added to gp); with the cell layer norm (dv [B, H] not empty) d_o (in gx[b, 3H + j])
    and dv[b], the gradient reaching c_new through hu, come from ``_lstm_lnc_bwd_row``."""
    one = A.dtype.type(1)
    t, peep, gp, zc, dv, gx = vo
    has_peep, has_zc, has_lnc = var and peep.shape[0] > 0, var and zc.shape[0] > 0, var and dv.shape[1] > 0
    for u in range(nu):
        j = J + u
        i, f, g, o = A[b, j], A[b, H + j], A[b, H + H + j], A[b, H + H + H + j]
        cp, dct = Cp[bp, j], DC[b, j]
        if has_lnc:
            d_o, dcn = gx[b, H + H + H + j], dv[b, j]
        else:
            dhu = D[rd, d0 + u] + GS[bs, j]
            tc = tanh(Cn[b, j])
            d_o = dhu * tc * d_sigmoid(o)
            dcn = dhu * o * d_tanh(tc)
        dcn += (one - zc[t, b, j]) * dct if has_zc else dct
        if has_peep:
            dcn += d_o * peep[2, j]
        d_i = dcn * g * d_sigmoid(i)
        d_f = dcn * cp * d_sigmoid(f)
        d_g = dcn * i * d_tanh(g)
        dcp = dcn * f
        if has_zc:
            dcp += zc[t, b, j] * dct
        if has_peep:
            dcp += d_i * peep[0, j] + d_f * peep[1, j]
            gp[0, j] += d_i * cp
            gp[1, j] += d_f * cp
            gp[2, j] += d_o * Cn[b, j]
        DC[b, j] = dcp
        O[u], O[UG + u], O[UG2 + u], O[UG3 + u] = d_i, d_f, d_g, d_o


@jit(**_JIT_INLINE)
def gru_bwd_units(nu, J, H, b, A, HN, Hp, bp, D, GS, bs, Ddir, O, var, dpn):
    """A[b]: saved r, z, n; HN[b]: h_n; Hp[bp]: h_{t-1}; ``d = D[b, j] + GS[bs, j]``: the gradient
    reaching h_t (variant: h_new); its direct part d z -> Ddir[b] (variant: added to it);
    O <- d_r, d_z, d_n (input side) and, at 3 UG, d_n r (the hidden side's n gradient). Variant
    reset_after=False (dpn [B, H] not empty): d_z, d_n only, d_n -> dpn[b] (``_gru_r_bwd_row``)."""
    one = A.dtype.type(1)
    split = var and dpn.shape[1] > 0
    for u in range(nu):
        j = J + u
        r, z, n = A[b, j], A[b, H + j], A[b, H + H + j]
        d = D[b, j] + GS[bs, j]
        d_n = d * (one - z) * d_tanh(n)
        O[UG + u] = d * (Hp[bp, j] - n) * d_sigmoid(z)
        O[UG2 + u] = d_n
        if split:
            dpn[b, j] = d_n
        else:
            O[u] = d_n * HN[b, j] * d_sigmoid(r)
            O[UG3 + u] = d_n * r
        if var:
            Ddir[b, j] += d * z
        else:
            Ddir[b, j] = d * z


@jit(**_JIT_INLINE)
def rnn_bwd_units(relu, nu, J, b, Hn, D, GS, bs, GX):
    """Hn[b]: h_t (variant: h_new); the gradient reaching it is D[b] + GS[bs]; GX[b] <- the
    pre-activation gradient. relu selects rather than multiplies by 0/1, so a NaN gradient
    stays out of units that relu switched off (as torch's threshold_backward)."""
    zero = Hn.dtype.type(0)
    for u in range(nu):
        j = J + u
        d = D[b, j] + GS[bs, j]
        if relu:
            GX[b, j] = d if Hn[b, j] > zero else zero
        else:
            GX[b, j] = d * d_tanh(Hn[b, j])


@jit(**_JIT_INLINE)
def _scatter_gates(O, o0, ngates, X, b, H, J, nu):
    """X[b, v*H + J + u] = O[o0 + v*UG + u] for gates v < ngates: one simple loop per gate."""
    for v in range(ngates):
        src, dst = o0 + U(v) * UG, U(v) * H + J
        for u in range(nu):
            X[b, dst + u] = O[src + u]


@jit(**_JIT_INLINE)
def _copy_units(src, b, dst, J, nu):
    for u in range(nu):
        dst[b, J + u] = src[b, J + u]


# ---------------------------------------------------------------------------------------------
# One thread's share of a step: panels [p0, p1) of the packed weights
# ---------------------------------------------------------------------------------------------
@jit(**_JIT)
def _row_tiles(m, mr_max):
    """Number of row tiles and the base tile height for m rows in tiles of at most mr_max
    (heights differ by at most one: 32 rows -> 6, 6, 5, 5, 5, 5)."""
    n = (m + mr_max - 1) // mr_max
    return n, (m // n if n > 0 else 0), (m % n if n > 0 else 0)


@jit(**_JIT)
def _gemm_tile(a, r0, mr, W, p, S, s_off, ldv, nv):
    """S[r, s_off + v*ldv + l] = (a[r0 + r] @ panel p of W)[v*L + l]; nv is 3 or 4."""
    K = W.shape[1]
    if nv == 3:
        tile_gemm(a, r0 * a.shape[1], a.shape[1], 1, mr, W, p * K * W.shape[2], W.shape[2], S, s_off, S.shape[1], ldv,
                  K, 3, MR3)
    else:
        tile_gemm(a, r0 * a.shape[1], a.shape[1], 1, mr, W, p * K * W.shape[2], W.shape[2], S, s_off, S.shape[1], ldv,
                  K, 4, MR4)


@jit(**_JIT)
def fwd_chunk(cell, p0, p1, step, Wf, st, S, O):
    """The plain forward step for the units of panels [p0, p1) of ``Wf`` and the m active rows
    (``step = (m, s, t, ts)``: the s-th step visited, at t, per-step outputs at slot ts).

    ``st`` (see rnn_forward): xw_t in, activated gates out (if training); c_state: c (LSTM);
    c_seq[ts] <- c_t; hn_seq[ts] <- W_hn h_{t-1} + b_hn (GRU); hu_seq[ts] <- o * tanh(c_t) (LSTM
    with a projection); h_seq[t] and the state hbuf[(s+1) % 2] <- h_t, from h_{t-1} in
    hbuf[s % 2], except for LSTM with a projection (then the projection's GEMM writes them).
    S: this thread's scratch tile; O: its scratch row [4 * UNIT_GROUP] for gate outputs."""
    m, s, t, ts = step
    save, xw, bh, h_seq, hbuf, c_state, c_seq, hu_seq, hn_seq = st
    h_in, h_out, x_t, h_seq_t = hbuf[s % 2], hbuf[(s + 1) % 2], xw[t], h_seq[t]
    proj = hu_seq.shape[0] > 0
    e2, e3 = h_out[:0], xw[:0]
    c_out = c_seq[ts] if cell == LSTM else e2
    hu_t = hu_seq[ts] if proj else h_seq_t
    hn_t = hn_seq[ts] if cell == GRU else e2
    G = x_t.shape[1]
    nv = Wf.shape[2] * x_t.itemsize // VEC_BYTES
    L = Wf.shape[2] // nv
    gate_layout = cell == LSTM or cell == GRU
    H = G // nv if gate_layout else G
    upp = L if gate_layout else nv * L              # units per panel
    ppg = UNIT_GROUP // upp                          # panels per group
    ldv = UNIT_GROUP if gate_layout else L
    n_tiles, base, extra = _row_tiles(m, MR3 if nv == 3 else MR4)
    for g0 in range(p0, p1, ppg):
        g1 = min(g0 + ppg, p1)
        J = g0 * upp
        nu = min(g1 * upp, H) - J
        r0 = 0
        for tile in range(n_tiles):
            mr = base + (1 if tile < extra else 0)
            for p in range(g0, g1):
                _gemm_tile(h_in, r0, mr, Wf, p, S, (p - g0) * (L if gate_layout else upp), ldv, nv)
            uJ, unu, uH, z0 = U(J), U(nu), U(H), U(0)
            for r in range(mr):
                b, ur = U(r0 + r), U(r)
                if cell == LSTM:
                    lstm_fwd_units(unu, uJ, uH, b, x_t, S, ur, UG, z0, bh, c_state, hu_t, O, save, c_out, False,
                                   (t, ts, e2, e3, e3, e2))
                elif cell == GRU:
                    gru_fwd_units(unu, uJ, uH, b, x_t, S, ur, UG, z0, bh, h_in, h_seq_t, O, save, hn_t, False,
                                  (e2, e2))
                else:
                    rnn_fwd_units(cell == RNN_RELU, unu, uJ, b, x_t, S, ur, z0, bh, h_seq_t, False, (ts, e3))
                if save and gate_layout:
                    _scatter_gates(O, z0, U(nv), x_t, b, uH, uJ, unu)
                if not proj:
                    _copy_units(h_seq_t, b, h_out, uJ, unu)
            r0 += mr


@jit(**_JIT)
def _gemm_group(g0, g1, m, W, a, S, out_a, out_b, accumulate):
    """out_a[:m, units of panels [g0, g1)] (+)= a[:m] @ W' for a plain-layout W (4 vectors per
    panel); also copied to out_b when it has rows."""
    N = out_a.shape[1]
    upp = W.shape[2]
    L = upp // 4
    J = g0 * upp
    nu = min(g1 * upp, N) - J
    n_tiles, base, extra = _row_tiles(m, MR4)
    r0 = 0
    for tile in range(n_tiles):
        mr = base + (1 if tile < extra else 0)
        for p in range(g0, g1):
            _gemm_tile(a, r0, mr, W, p, S, (p - g0) * upp, L, 4)
        uJ, unu = U(J), U(nu)
        for r in range(mr):
            _store_row(S, U(r), out_a, U(r0 + r), uJ, unu, S[0], False, accumulate)
            if out_b.shape[0] > 0:
                _copy_units(out_a, U(r0 + r), out_b, uJ, unu)
        r0 += mr


@jit(**_JIT)
def gemm_chunk(p0, p1, m, W, a, S, out_a, out_b, accumulate):
    """``_gemm_group`` over panels [p0, p1), a group of UNIT_GROUP units at a time."""
    ppg = UNIT_GROUP // W.shape[2]
    for g0 in range(p0, p1, ppg):
        _gemm_group(g0, min(g0 + ppg, p1), m, W, a, S, out_a, out_b, accumulate)


@jit(**_JIT)
def bwd_chunk(cell, p0, p1, step, W, st, S, O):
    """The plain backward step for the units of panels [p0, p1) of W, ``step = (m, t, tp, m_prev,
    tg, mg)``: gates' gradients to grad_xw[t] (GRU: and grad_hw[t]), dc (LSTM) and dh carried.

    Without a projection (W: W_hh packed; Hr = H) first ``dh[:mg] (+)= grad_hw[tg, :mg] @ W_hh``
    for these units (the gradient of the step visited before, tg; for GRU it accumulates onto
    the direct part ``dh * z``), then the cell backward for rows [0, m), where the gradient
    reaching h_t is ``dh + grad_h_seq[t]``. With one (LSTM; W: W_hr packed; dh holds the gradient
    reaching h_t, PH_PROJ_DH) row tiles of ``dhu = dh @ W_hr``, each handed to the cell backward
    at once (GS = ``zeros`` [1, H]). The state the rows started from: c_{t-1} (LSTM) / h_{t-1}
    (GRU) of step tp for the m_prev rows active there, the initial state for the others."""
    m, t, tp, m_prev, tg, mg = step
    gs, h_seq, acts, c_seq, hn_seq, h0, c0, dh, dc, grad_xw, grad_hw, ghp, zeros = st
    proj = ghp.shape[0] > 0
    gs_t, gx_t, gh_t, h_t, e2, e3 = gs[t], grad_xw[t], grad_hw[t], h_seq[t], dh[:0], grad_xw[:0]
    a_t = acts[t] if (cell == LSTM or cell == GRU) else e2
    c_t = c_seq[t] if cell == LSTM else e2
    hn_t = hn_seq[t] if cell == GRU else e2
    seq, init = (c_seq, c0) if cell == LSTM else ((h_seq, h0) if cell == GRU else (acts, e2))
    prev = seq[tp] if m_prev > 0 and (cell == LSTM or cell == GRU) else init
    H = c_t.shape[1] if proj else dh.shape[1]
    upp = W.shape[2]
    ppg = UNIT_GROUP // upp
    n_tiles, base, extra = _row_tiles(m, MR4) if proj else (1, m, 0)
    uH, z0 = U(H), U(0)
    for g0 in range(p0, p1, ppg):
        g1 = min(g0 + ppg, p1)
        if mg > 0 and not proj:
            _gemm_group(g0, g1, mg, W, grad_hw[tg], S, dh, e2, cell == GRU)
        J = g0 * upp
        uJ, unu = U(J), U(min(g1 * upp, H) - J)
        r0 = 0
        for tile in range(n_tiles):
            mr = base + (1 if tile < extra else 0)
            if proj:
                for p in range(g0, g1):
                    _gemm_tile(dh, r0, mr, W, p, S, (p - g0) * upp, upp // 4, 4)
            for r in range(mr):
                bi = r0 + r
                b = U(bi)
                if cell == LSTM:
                    D, rd, d0, GS, bs = (S, U(r), z0, zeros, z0) if proj else (dh, b, uJ, gs_t, b)
                    lstm_bwd_units(unu, uJ, uH, b, a_t, c_t, prev if bi < m_prev else init, b, D, rd, d0, GS, bs, dc,
                                   O, False, (t, e2, e2, e3, e2, e2))
                    _scatter_gates(O, z0, U(4), gx_t, b, uH, uJ, unu)
                elif cell == GRU:
                    gru_bwd_units(unu, uJ, uH, b, a_t, hn_t, prev if bi < m_prev else init, b, dh, gs_t, b, dh, O,
                                  False, e2)
                    _scatter_gates(O, z0, U(3), gx_t, b, uH, uJ, unu)
                    _scatter_gates(O, z0, U(2), gh_t, b, uH, uJ, unu)
                    _scatter_gates(O, UG3, U(1), gh_t, b, uH, uJ + U(2) * uH, unu)
                else:
                    rnn_bwd_units(cell == RNN_RELU, unu, uJ, b, h_t, dh, gs_t, b, gx_t)
            r0 += mr


# ---------------------------------------------------------------------------------------------
# Variants beyond cuDNN (docs/variants.md). ``var``, the kernels' last argument, is
#
#   VAR = (w_n, ln_w, ln_b, lnc_w, lnc_b, peep, rec_mask, zh, zc, reset,   the options
#          hw_hat, hw_rstd, c_hat, c_rstd, new_seq)                        what they save
#
# (flat: numba's parallel regions take no nested tuple; backward appends the per-thread
# parameter gradients), an array empty when its option is off: w_n [H, Hr] = W_hh[2H:] for GRU
# reset_after=False; ln_w, ln_b [G]; lnc_w, lnc_b [H]; peep [3, H]; rec_mask [B, Hr]; zh
# [T, B, Hr]; zc [T, B, H]; reset [T, B] bool; hw_hat [T|1, B, G], hw_rstd [T|1, B]; c_hat
# [T|1, B, H], c_rstd [T|1, B]; new_seq [T|1, B, H] (LSTM c_new / RNN h_new, before zoneout).
#
# A layer norm over all G entries of a row needs the row's whole product before any gate, so
# a variant step is a sequence of phases, each one parallel region: GEMM phases (the panels of
# the packed weights split between threads, as the plain step's) and row phases (batch rows
# split between threads; one pass over a row does its layer-norm statistics, gate math, cell
# state, zoneout and what backward needs saved).
# Forward: [A = h_in W^T] -> rows (LN, cell)  [GRU reset_after=False: -> An = (r*h_in) W_hn^T
# -> rows (n, h)]  [projection: -> h_new = hu W_hr^T -> rows (zoneout)].
# Backward: rows (dh_new)  [projection: -> dhu = dh_new W_hr]  -> rows (cell backward, LN
# backward)  [GRU reset_after=False: -> d(r h_in) = d_n W_hn -> rows (d_r)]  -> dh_in = grad_hw
# W_hh -> rows (rec_mask, zoneout, reset). Every phase, and the plain step's, runs through one
# dispatcher per direction (``_fwd_phase`` / ``_bwd_phase``) and its single ``prange``: outlined
# parallel regions are most of the compile time. Phase numbers are numpy integers: numba would
# compile a dispatcher per literal value of a Python int.
# ---------------------------------------------------------------------------------------------
(PH_GEMM, PH_STEP, PH_PROJ_DH, PH_ROWS, PH_ROWS_N, PH_ROWS_H, PH_PRE, PH_CELL, PH_R,
 PH_FINISH) = map(np.int64, range(10))
ONE_THREAD, NO = np.int64(1), np.bool_(False)
_JIT_REASSOC = dict(_JIT, fastmath={"contract", "reassoc"})   # sums: vectorised; NaN still propagates
LN_EPS = 1e-5   # fastrnn.contract.rnn.LN_EPS (not imported: this file must not depend on torch)


@jit(**_JIT_REASSOC)
def _row_sum(a, b, n):
    """sum(a[b, :n]), reassociated (vector partial sums); not inlined, so the flag stays local."""
    s = a.dtype.type(0)
    for k in range(n):
        s += a[b, k]
    return s


@jit(**_JIT_REASSOC)
def _row_sq_dev(a, b, n, mean):
    """sum((a[b, :n] - mean)^2)."""
    s = a.dtype.type(0)
    for k in range(n):
        d = a[b, k] - mean
        s += d * d
    return s


@jit(**_JIT_REASSOC)
def _row_dot2(d, b, w, hat, n):
    """(sum(d[b] * w), sum(d[b] * w * hat[b])) over n entries: the layer-norm backward sums."""
    s1 = d.dtype.type(0)
    s2 = d.dtype.type(0)
    for k in range(n):
        x = d[b, k] * w[k]
        s1 += x
        s2 += x * hat[b, k]
    return s1, s2


@jit(**_JIT)
def _ln_stats(a, b, n):
    """mean and 1 / sqrt(biased var + eps) of a[b, :n] (two passes: no cancellation)."""
    one, nf = a.dtype.type(1), a.dtype.type(n)
    mean = _row_sum(a, b, n) / nf
    var = _row_sq_dev(a, b, n, mean) / nf
    return mean, one / math.sqrt(var + a.dtype.type(LN_EPS))


@jit(**_JIT)
def _ln_row(b, ts, n, A, ln_w, ln_b, hat, rstd):
    """A[b, :n] <- LN(A[b]; ln_w, ln_b), saving the normalised row and its rstd at slot ts."""
    ub = U(b)
    mean, rs = _ln_stats(A, b, n)
    rstd[ts, b] = rs
    ht = hat[ts]
    for k in range(U(n)):
        h = (A[ub, k] - mean) * rs
        ht[ub, k] = h
        A[ub, k] = h * ln_w[k] + ln_b[k]


@jit(**_JIT)
def _ln_bwd_row(b, t, c, n, D, dst, ln_w, hat, rstd, g_w, g_b):
    """Layer-norm backward of one row: D[b, :n] = gradient of y = w * v_hat + bias ->
    dst[b] = gradient of v; g_w[c], g_b[c] += this row's weight / bias grads. dst = D would be
    correct but about 4x slower: LLVM's overlap check then fails and the scalar loop runs."""
    ub = U(b)
    ht = hat[t]
    s1, s2 = _row_dot2(D, b, ln_w, ht, n)
    rs = rstd[t, b]
    nf = D.dtype.type(n)
    m1, m2 = s1 / nf, s2 / nf
    gw, gb = g_w[c], g_b[c]
    for k in range(U(n)):
        d, h = D[ub, k], ht[ub, k]
        gw[k] += d * h
        gb[k] += d
        dst[ub, k] = rs * (d * ln_w[k] - m1 - h * m2)


@jit(**_JIT)
def _gru_n_row(b, H, X, An, bh, hprev, hn, hnew):
    """GRU reset_after=False, second half of row b: An[b] = (r h_in) W_hn^T; n into X[b];
    hn[b] <- An + b_hn; hnew[b] <- (1-z) n + z h_prev."""
    one = X.dtype.type(1)
    ub, uH = U(b), U(H)
    for j in range(uH):
        h_n = An[ub, j] + bh[uH + uH + j]
        n = tanh(X[ub, uH + uH + j] + h_n)
        z = X[ub, uH + j]
        X[ub, uH + uH + j] = n
        hn[ub, j] = h_n
        hnew[ub, j] = (one - z) * n + z * hprev[ub, j]


@jit(**_JIT)
def _h_finish_row(b, t, Hr, hnew, hcur, zh, h_seq):
    """h_t = zh h_prev + (1 - zh) h_new (zoneout) or h_new, into the state hcur[b] and h_seq[t, b]."""
    one = hnew.dtype.type(1)
    ub = U(b)
    hs = h_seq[t]
    if zh.shape[0] > 0:
        zt = zh[t]
        for k in range(U(Hr)):
            h = zt[ub, k] * hcur[ub, k] + (one - zt[ub, k]) * hnew[ub, k]
            hcur[ub, k] = h
            hs[ub, k] = h
    else:
        for k in range(U(Hr)):
            h = hnew[ub, k]
            hcur[ub, k] = h
            hs[ub, k] = h


@jit(**_JIT)
def _bwd_pre_row(b, t, Hr, dh, gs, zh, dnew, ddir, ghp, proj):
    """Gradient reaching h_t (dh[b] from step t+1, gs[t, b] from the output) split by zoneout:
    dnew[b] <- (1 - zh) of it (to h_new), ddir[b] <- zh of it (straight to h_prev); with a
    projection dnew is also recorded in ghp[t, b] (grad_hproj)."""
    one, zero = dh.dtype.type(1), dh.dtype.type(0)
    ub = U(b)
    gst = gs[t]
    if zh.shape[0] > 0:
        zt = zh[t]
        for k in range(U(Hr)):
            d = dh[ub, k] + gst[ub, k]
            dnew[ub, k] = (one - zt[ub, k]) * d
            ddir[ub, k] = zt[ub, k] * d
    else:
        for k in range(U(Hr)):
            dnew[ub, k] = dh[ub, k] + gst[ub, k]
            ddir[ub, k] = zero
    if proj:
        gt = ghp[t]
        for k in range(U(Hr)):
            gt[ub, k] = dnew[ub, k]


@jit(**_JIT)
def _lstm_lnc_bwd_row(b, t, c, H, A, D, lnc_w, lnc_b, c_hat, c_rstd, dy, dv, gx, g_w, g_b):
    """LSTM with the cell layer norm (hu = o tanh(y), y = LN(c_new)), row b: A[b]: saved gates;
    D[b]: gradient reaching hu; gx[b, 3H:] <- d_o; dv[b] <- the gradient reaching c_new through y;
    dy [B, >= H]: scratch for the gradient of y (not in place: see _ln_bwd_row); g_w, g_b[c] +=."""
    ub, uH = U(b), U(H)
    ch = c_hat[t]
    for j in range(uH):
        o = A[ub, uH + uH + uH + j]
        tc = tanh(ch[ub, j] * lnc_w[j] + lnc_b[j])
        d = D[ub, j]
        gx[ub, uH + uH + uH + j] = d * tc * d_sigmoid(o)
        dy[ub, j] = d * o * d_tanh(tc)
    _ln_bwd_row(b, t, c, H, dy, dv, lnc_w, c_hat, c_rstd, g_w, g_b)


@jit(**_JIT)
def _gru_r_bwd_row(b, H, A, HP, bp, mask, drh, gx, dhin):
    """GRU reset_after=False, second half: drh[b] = d(r h_in); d_r into gx[b]; dhin[b] <- drh r
    (the part of h_in's gradient through r * h_in; the W_h{r,z} product is added after)."""
    ub = U(b)
    has_mask = mask.shape[0] > 0
    for j in range(U(H)):
        r = A[ub, j]
        h_in = HP[bp, j] * mask[ub, j] if has_mask else HP[bp, j]
        gx[ub, j] = drh[ub, j] * h_in * d_sigmoid(r)
        dhin[ub, j] = drh[ub, j] * r


@jit(**_JIT)
def _bwd_finish_row(b, t, dhin, mask, ddir, reset, dh, dc, gh0, gc0):
    """dh_prev = dh_in * rec_mask + ddir; a reset row sends it (and dc_prev) to the initial
    state's gradient gh0 / gc0 and carries 0, other rows carry it in dh[b] (dc[b] already holds dc_prev)."""
    zero = dh.dtype.type(0)
    ub = U(b)
    Hr, H = U(dh.shape[1]), U(dc.shape[1])
    if mask.shape[0] > 0:
        for k in range(Hr):
            dhin[ub, k] = dhin[ub, k] * mask[ub, k] + ddir[ub, k]
    else:
        for k in range(Hr):
            dhin[ub, k] += ddir[ub, k]
    if reset.shape[0] > 0 and reset[t, b]:
        for k in range(Hr):
            gh0[ub, k] += dhin[ub, k]
            dh[ub, k] = zero
        for j in range(H):
            gc0[ub, j] += dc[ub, j]
            dc[ub, j] = zero
    else:
        for k in range(Hr):
            dh[ub, k] = dhin[ub, k]


@jit(**_JIT)
def _prev_state(b, t, tp, m_prev, seq, init, reset):
    """The state row b entered step t with: ``init`` after a reset or at the row's first step
    (b >= m_prev), else ``seq[tp]`` (the saved state of the previously visited step)."""
    if b >= m_prev or (reset.shape[0] > 0 and reset[t, b]):
        return init
    return seq[tp]


# ---------------------------------------------------------------------------------------------
# Phases and whole-sequence kernels
# ---------------------------------------------------------------------------------------------
@jit(**_JIT)
def _threads(macs, panels, nth_max, min_macs):
    """Threads for one step: one when the step is too small to repay a parallel region."""
    if macs < min_macs or nth_max < 2:
        return 1
    return min(nth_max, panels)


@jit(**_JIT)
def _fwd_phase(ph, c, nth, cell, step, W, S, O, st, var, vs):
    """Thread c of nth's share of forward phase ph, ``step = (m, s, t, ts)`` (``st``, ``vs``: see
    rnn_forward). PH_GEMM: ``W = (packed weights, a, out_a, out_b, accumulate)``, out_a (and
    out_b) = a[:m] @ W' for the units of c's panels. PH_STEP: the plain step on c's panels of
    W[0] (``fwd_chunk``). Variant row phases, on c's share of the m rows: PH_ROWS layer norm and
    cell (GRU reset_after=False: r, z), then h_t unless a GEMM phase follows; PH_ROWS_N (GRU
    reset_after=False) n and h_t; PH_ROWS_H (projection) h_t from h_new."""
    Wp, a, out_a, out_b, acc = W
    P = Wp.shape[0]
    if ph == PH_GEMM:
        gemm_chunk(c * P // nth, (c + 1) * P // nth, step[0], Wp, a, S, out_a, out_b, acc)
        return
    if var is None:   # decided at compile time: the plain kernel has no row phases
        fwd_chunk(cell, c * P // nth, (c + 1) * P // nth, step, Wp, st, S, O)
        return
    m, s, t, ts = step
    training, xw, bh, h_seq, hbuf, c_state, c_seq, hu_seq, hn_seq = st
    w_n, ln_w, ln_b, lnc_w, lnc_b, peep, mask, zh, zc, reset, hw_hat, hw_rstd, c_hat, c_rstd, new_seq = var
    A, An, rh, src, cn = vs
    X, hcur, hnew = xw[t], hbuf[0], hbuf[1]
    G, Hr = A.shape[1], hcur.shape[1]
    H = G // 4 if cell == LSTM else (G // 3 if cell == GRU else G)
    split, proj = rh.shape[1] > 0, hu_seq.shape[0] > 0
    hu = hu_seq[ts] if proj else hnew
    cs = c_seq[ts] if cell == LSTM else hnew[:0]
    hn = hn_seq[ts] if cell == GRU else hnew[:0]
    uH, z0 = U(H), U(0)
    for b in range(c * m // nth, (c + 1) * m // nth):
        ub = U(b)
        if ph == PH_ROWS:
            if ln_w.shape[0] > 0:
                _ln_row(b, ts, G, A, ln_w, ln_b, hw_hat, hw_rstd)
            for J0 in range(0, H, UNIT_GROUP):
                J, nu = U(J0), U(min(UNIT_GROUP, H - J0))
                if cell == LSTM:
                    lstm_fwd_units(nu, J, uH, ub, X, A, ub, uH, J, bh, c_state, hu, O, True, cs, True,
                                   (t, ts, peep, zc, new_seq, cn))
                    _scatter_gates(O, z0, U(4), X, ub, uH, J, nu)
                elif cell == GRU:
                    gru_fwd_units(nu, J, uH, ub, X, A, ub, uH, J, bh, hcur, hnew, O, True, hn, True, (src, rh))
                    _scatter_gates(O, z0, U(2) if split else U(3), X, ub, uH, J, nu)
                else:
                    rnn_fwd_units(cell == RNN_RELU, nu, J, ub, X, A, ub, J, bh, hnew, True, (ts, new_seq))
            if cn.shape[1] > 0:   # hu = o tanh(LN(c_new)): the norm needs every c_new of the row first
                _ln_row(b, ts, H, cn, lnc_w, lnc_b, c_hat, c_rstd)
                for j in range(uH):
                    hu[ub, j] = X[ub, uH + uH + uH + j] * tanh(cn[ub, j])
            if split or proj:
                continue
        elif ph == PH_ROWS_N:
            _gru_n_row(b, H, X, An, bh, hcur, hn, hnew)
        _h_finish_row(b, t, Hr, hnew, hcur, zh, h_seq)


# Every parallel loop has a serial twin taken when the call may use one thread (nth == 1): a
# fork child must open no parallel region at all (runtime.py), and a one-thread region would
# only cost its fork/join. Both pass the thread index as an int64, so that numba compiles the
# phase once (not for a literal 0, an int64 and prange's uint64: 3x the compile time).
@jit(**_JIT_PARALLEL)
def _run_fwd(ph, nth, cell, step, W, S, O, st, var, vs):
    """Forward phase ph on nth threads (on the calling thread when nth == 1)."""
    if nth == 1:
        _fwd_phase(ph, np.int64(0), nth, cell, step, W, S[0], O[0], st, var, vs)
    else:
        for c in prange(nth):
            _fwd_phase(ph, np.int64(c), nth, cell, step, W, S[c], O[c], st, var, vs)


@jit(**_JIT_PARALLEL)
def _packed(M, units, K, trans, gates, nv, nth):
    """The weights of ``y = x @ M'`` (``units`` output columns, K inputs) packed into panels of nv
    vectors (see pack_panel: ``gates`` > 1 is the gate layout); in parallel unless nth == 1."""
    L = VEC_BYTES // M.itemsize
    upp = L if gates > 1 else nv * L     # units per panel
    W = np.empty(((units + upp - 1) // upp, K, nv * L), M.dtype)
    if nth == 1:
        for p in range(W.shape[0]):
            pack_panel(M, trans, gates, units, nv, W, p)
    else:
        for p in prange(W.shape[0]):
            pack_panel(M, trans, gates, units, nv, W, p)
    return W


@jit(**_JIT)
def rnn_forward(nth_max, min_macs, cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, out, var):
    """Forward recurrence over all T steps.

    nth_max     threads to use at most (``runtime.kernel_call``'s count: passed in because
                calling numba.get_num_threads() from compiled code would make the kernel
                uncacheable); 1: no parallel region at all (a fork child must open none)
    min_macs    a step with fewer multiply-adds runs on one thread (PAR_MIN_MACS)
    cell        LSTM | GRU | RNN_TANH | RNN_RELU
    xw          [T, B, G]  in: x W_ih^T + b_ih;  out when training: activated gates (LSTM
                           i,f,g,o; GRU r,z,n), zero on inactive rows; otherwise scratch
    w_hh [G, Hr]; b_hh [G] (zeros when absent); h0 [B, Hr]; c0 [B, H] (LSTM, else empty)
    w_hr        [Hr, H] (LSTM with projection) or empty [0, 0]
    batch_sizes [T] int64 (all B when not packed)
    out         (h_seq, h_state, c_state, c_seq, hu_seq, hn_seq), written:
                h_seq [T, B, Hr] (zero on inactive rows); h_state [B, Hr]: h_T; c_state [B, H]:
                c_T (LSTM, else empty); c_seq [T, B, H] when training (LSTM: c_t), else [1, B, H]
                scratch, empty for other cells; hu_seq the same for o * tanh(c_t) (LSTM with a
                projection, else empty); hn_seq the same for W_hn h_{t-1} + b_hn (GRU)
    var         None: the plain cell; else VAR (the variant section), whose saved arrays are
                written like c_seq (c_seq then holds c_t after zoneout, hn_seq the n gate's
                hidden side as used)
    """
    h_seq, h_state, c_state, c_seq, hu_seq, hn_seq = out
    T, B, G = xw.shape
    Hr = w_hh.shape[1]
    proj = w_hr.shape[0] > 0
    H = G // 4 if cell == LSTM else (G // 3 if cell == GRU else G)
    dt = xw.dtype
    S = np.empty((nth_max, max(MR3, MR4), 4 * UNIT_GROUP), dt)   # per thread: GEMM tile
    O = np.empty((nth_max, 4 * UNIT_GROUP), dt)                   # and gate-output row
    hbuf = np.empty((2, B, Hr), dt)    # plain: h_{t-1} and h_t, alternating; variant: the state, h_new
    hbuf[0, :, :] = h0
    if cell == LSTM:
        c_state[:, :] = c0
    e2 = h_state[:0]
    st = (training, xw, b_hh, h_seq, hbuf, c_state, c_seq, hu_seq, hn_seq)
    Wr = _packed(w_hr, Hr, H, False, 1, 4, nth_max) if proj else S[:0]
    if var is None:
        nv = 3 if cell == GRU else 4    # gate layout: a panel holds every gate of its units (not RNN's)
        Wf = _packed(w_hh, H, Hr, False, nv if cell == LSTM or cell == GRU else 1, nv, nth_max)
        Wn, vs = Wf[:0], (e2, e2, e2, e2, e2)
    else:
        w_n, mask, lnc_w = var[0], var[6], var[3]
        hs = H if w_n.shape[0] > 0 else 0    # GRU reset_after=False: W_h{r,z} and W_hn apart
        Wf = _packed(w_hh, 2 * H if hs > 0 else G, Hr, False, 1, 4, nth_max)
        Wn = _packed(w_n, H, Hr, False, 1, 4, nth_max) if hs > 0 else Wf[:0]
        # A: the hidden product; An, rh: (r * h_in) W_hn^T and r * h_in; src: h_in (rec_mask:
        # h_prev * rec_mask, else the state itself); cn: c_new for the cell layer norm
        vs = (np.empty((B, G), dt), np.empty((B, hs), dt), np.empty((B, hs), dt),
              np.empty((B, Hr), dt) if mask.shape[0] > 0 else hbuf[0],
              np.empty((B, H if lnc_w.shape[0] > 0 else 0), dt))
    for s in range(T):
        t = T - 1 - s if reverse else s
        m = batch_sizes[t]
        ts = t if training else 0
        step = (m, s, t, ts)
        if var is None:
            nth = _threads(m * G * Hr, Wf.shape[0], nth_max, min_macs)
            _run_fwd(PH_STEP, nth, cell, step, (Wf, e2, e2, e2, NO), S, O, st, var, vs)
            if proj:
                nth = _threads(m * H * Hr, Wr.shape[0], nth_max, min_macs)
                _run_fwd(PH_GEMM, nth, cell, step, (Wr, hu_seq[ts], hbuf[(s + 1) % 2], h_seq[t], NO), S, O, st, var,
                         vs)
            if m < B:  # finished rows keep their state
                hbuf[(s + 1) % 2, m:] = hbuf[s % 2, m:]
        else:
            A, An, rh, src, cn = vs
            mask, reset = var[6], var[9]
            hcur = hbuf[0]
            for b in range(m):  # the state entering the step: reset rows restart from (h0, c0)
                if reset.shape[0] > 0 and reset[t, b]:
                    hcur[b] = h0[b]
                    if cell == LSTM:
                        c_state[b] = c0[b]
                if mask.shape[0] > 0:
                    for k in range(Hr):
                        src[b, k] = hcur[b, k] * mask[b, k]
            nth = _threads(m * G * Hr, Wf.shape[0], nth_max, min_macs)
            _run_fwd(PH_GEMM, nth, cell, step, (Wf, src, A, e2, NO), S, O, st, var, vs)
            _run_fwd(PH_ROWS, nth, cell, step, (Wf, src, A, e2, NO), S, O, st, var, vs)
            if rh.shape[1] > 0:
                _run_fwd(PH_GEMM, nth, cell, step, (Wn, rh, An, e2, NO), S, O, st, var, vs)
                _run_fwd(PH_ROWS_N, nth, cell, step, (Wn, rh, An, e2, NO), S, O, st, var, vs)
            if proj:   # zoneout after the projection is a few flops per unit: no fork/join for it
                _run_fwd(PH_GEMM, nth, cell, step, (Wr, hu_seq[ts], hbuf[1], e2, NO), S, O, st, var, vs)
                _run_fwd(PH_ROWS_H, ONE_THREAD, cell, step, (Wr, e2, e2, e2, NO), S, O, st, var, vs)
        if m < B:  # finished rows: outputs and saved entries zero
            h_seq[t, m:] = 0
            if training:
                xw[t, m:] = 0
                for seq in (c_seq, hu_seq, hn_seq):
                    if seq.shape[0] > 0:
                        seq[t, m:] = 0
                if var is not None:   # hw_hat, c_hat, new_seq; hw_rstd, c_rstd
                    for seq in (var[10], var[12], var[14]):
                        if seq.shape[0] > 0:
                            seq[t, m:] = 0
                    for vec in (var[11], var[13]):
                        if vec.shape[0] > 0:
                            vec[t, m:] = 0
    h_state[:, :] = hbuf[T % 2] if var is None else hbuf[0]


@jit(**_JIT)
def rnn_forward_var(nth_max, min_macs, cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, out,
                    var):
    """``rnn_forward`` with a variant: its own entry point, so that the variant compiles (or
    loads from the cache) on its first use only, timed apart in ``numba_rnn.info()``."""
    rnn_forward(nth_max, min_macs, cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, out, var)


@jit(**_JIT)
def _bwd_phase(ph, c, nth, cell, step, W, S, O, st, var, vs):
    """Thread c of nth's share of backward phase ph, ``step = (m, t, tp, m_prev, tg, mg)`` (see
    rnn_backward). PH_GEMM as forward's. Plain: PH_STEP ``bwd_chunk`` on c's panels of W[0]; with
    a projection first PH_PROJ_DH: dh = the gradient of step tg through W_hh, plus grad_h_seq[t]
    (recorded in grad_hproj), for c's Hr-units. Variant row phases on c's share of the m rows:
    PH_PRE the gradient reaching h_new (zoneout), PH_CELL cell and layer-norm backward, PH_R (GRU
    reset_after=False) d_r, PH_FINISH rec_mask, zoneout's direct part, resets."""
    Wp, a, out_a, out_b, acc = W
    P = Wp.shape[0]
    p0, p1 = c * P // nth, (c + 1) * P // nth
    m, t, tp, m_prev, tg, mg = step
    if ph == PH_GEMM:
        gemm_chunk(p0, p1, m, Wp, a, S, out_a, out_b, acc)
        return
    gs, h_seq, acts, c_seq, hn_seq, h0, c0, dh, dc, grad_xw, grad_hw, ghp, zeros = st
    if var is None:   # decided at compile time: the plain kernel has no row phases
        if ph == PH_PROJ_DH:
            gemm_chunk(p0, p1, mg, Wp, grad_hw[tg], S, dh, out_b, acc)
            gs_t, ghp_t = gs[t], ghp[t]
            J0, J1 = U(min(p0 * Wp.shape[2], dh.shape[1])), U(min(p1 * Wp.shape[2], dh.shape[1]))
            for b in range(U(m)):
                for j in range(J0, J1):
                    dh[b, j] += gs_t[b, j]
                    ghp_t[b, j] = dh[b, j]
        else:
            bwd_chunk(cell, p0, p1, step, Wp, st, S, O)
        return
    (w_n, ln_w, ln_b, lnc_w, lnc_b, peep, mask, zh, zc, reset, hw_hat, hw_rstd, c_hat, c_rstd, new_seq,
     g_ln_w, g_ln_b, g_lnc_w, g_lnc_b, g_peep) = var
    dnew, ddir, dhu, dhin, dv, dtmp, dpn, drh, gh0, gc0 = vs
    gx, gh, a_t = grad_xw[t], grad_hw[t], acts[t]
    G, Hr = gx.shape[1], dh.shape[1]
    H = G // 4 if cell == LSTM else (G // 3 if cell == GRU else G)
    proj, split, has_ln = dhu.shape[1] > 0, dpn.shape[1] > 0, ln_w.shape[0] > 0
    # c_new (LSTM) / h_new (RNN) before zoneout; GRU's h_n; a thread's peephole gradient
    new_t = new_seq[t] if new_seq.shape[0] > 0 else (c_seq[t] if cell == LSTM else h_seq[t])
    hn_t = hn_seq[t] if cell == GRU else dh[:0]
    gp = g_peep[c] if peep.shape[0] > 0 else peep
    uH, z0 = U(H), U(0)
    for b in range(c * m // nth, (c + 1) * m // nth):
        ub = U(b)
        if ph == PH_PRE or (ph == PH_CELL and not proj):
            _bwd_pre_row(b, t, Hr, dh, gs, zh, dnew, ddir, ghp, proj)
        if ph == PH_CELL:
            if cell == LSTM:
                D = dhu if proj else dnew
                cp = _prev_state(b, t, tp, m_prev, c_seq, c0, reset)
                if dv.shape[1] > 0:
                    _lstm_lnc_bwd_row(b, t, c, H, a_t, D, lnc_w, lnc_b, c_hat, c_rstd, dtmp, dv, gx, g_lnc_w, g_lnc_b)
                for J0 in range(0, H, UNIT_GROUP):
                    J, nu = U(J0), U(min(UNIT_GROUP, H - J0))
                    lstm_bwd_units(nu, J, uH, ub, a_t, new_t, cp, ub, D, ub, J, zeros, z0, dc, O, True,
                                   (t, peep, gp, zc, dv, gx))
                    _scatter_gates(O, z0, U(4), gx, ub, uH, J, nu)
            elif cell == GRU:
                hp = _prev_state(b, t, tp, m_prev, h_seq, h0, reset)
                dst = dtmp if has_ln else gh    # with layer norm, d hw is the norm's backward input
                for J0 in range(0, H, UNIT_GROUP):
                    J, nu = U(J0), U(min(UNIT_GROUP, H - J0))
                    gru_bwd_units(nu, J, uH, ub, a_t, hn_t, hp, ub, dnew, zeros, z0, ddir, O, True, dpn)
                    if split:
                        _scatter_gates(O, UG, U(2), gx, ub, uH, J + uH, nu)
                    else:
                        _scatter_gates(O, z0, U(3), gx, ub, uH, J, nu)
                        _scatter_gates(O, z0, U(2), dst, ub, uH, J, nu)
                        _scatter_gates(O, UG3, U(1), dst, ub, uH, J + U(2) * uH, nu)
            else:
                rnn_bwd_units(cell == RNN_RELU, uH, z0, ub, new_t, dnew, zeros, z0, gx)
            if has_ln:   # through the hidden-side layer norm: grad_hw = d a
                _ln_bwd_row(b, t, c, G, dtmp if cell == GRU else gx, gh, ln_w, hw_hat, hw_rstd, g_ln_w, g_ln_b)
        elif ph == PH_R:
            _gru_r_bwd_row(b, H, a_t, _prev_state(b, t, tp, m_prev, h_seq, h0, reset), ub, mask, drh, gx, dhin)
        elif ph == PH_FINISH:
            _bwd_finish_row(b, t, dhin, mask, ddir, reset, dh, dc, gh0, gc0)


@jit(**_JIT_PARALLEL)
def _run_bwd(ph, nth, cell, step, W, S, O, st, var, vs):
    """Backward phase ph on nth threads (on the calling thread when nth == 1)."""
    if nth == 1:
        _bwd_phase(ph, np.int64(0), nth, cell, step, W, S[0], O[0], st, var, vs)
    else:
        for c in prange(nth):
            _bwd_phase(ph, np.int64(c), nth, cell, step, W, S[c], O[c], st, var, vs)


@jit(**_JIT)
def rnn_backward(nth_max, min_macs, cell, grad_h_seq, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved, dh, dc,
                 out, var):
    """Backward recurrence over all T steps (the forward's steps in the opposite order).

    nth_max, min_macs: as in rnn_forward
    grad_h_seq  [T, B, Hr];  w_hh [G, Hr];  w_hr [Hr, H] or empty;  h0 [B, Hr];  c0 [B, H] or empty
    saved       (h_seq, acts, c_seq, hn_seq): what the forward saved (empty where unused)
    dh          [B, Hr]  in: grad_h_T;  out: grad_h0
    dc          [B, H]   in: grad_c_T;  out: grad_c0 (LSTM, else empty)
    out         (grad_xw [T, B, G], grad_hw [T, B, G], grad_hproj [T, B, Hr]) written: grad_hw is
                the same array as grad_xw unless they differ (GRU reset_after=True, layer norm);
                grad_hproj: the gradient reaching each projected h_t (empty without W_hr)
    var         None: the plain cell; else VAR (the variant section) + the zeroed per-thread
                accumulators of the parameter gradients (summed by the caller), empty when the
                option is off: g_ln_w, g_ln_b [nth_max, G], g_lnc_w, g_lnc_b [nth_max, H],
                g_peep [nth_max, 3, H]
    """
    h_seq, acts, c_seq, hn_seq = saved
    grad_xw, grad_hw, grad_hproj = out
    T, B, G = grad_xw.shape
    Hr = w_hh.shape[1]
    proj = w_hr.shape[0] > 0
    H = G // 4 if cell == LSTM else (G // 3 if cell == GRU else G)
    dt = grad_xw.dtype
    e2 = dh[:0]
    zeros = np.zeros((1, H), dt)
    S = np.empty((nth_max, max(MR3, MR4), 4 * UNIT_GROUP), dt)
    O = np.empty((nth_max, 4 * UNIT_GROUP), dt)
    st = (grad_h_seq, h_seq, acts, c_seq, hn_seq, h0, c0, dh, dc, grad_xw, grad_hw, grad_hproj, zeros)
    hs = 0                                   # GRU reset_after=False: H (W_h{r,z} and W_hn apart)
    if var is not None:
        hs = H if var[0].shape[0] > 0 else 0
    Wb = _packed(w_hh, Hr, 2 * H if hs > 0 else G, True, 1, 4, nth_max)     # dh_in = grad_hw W_hh
    Wu = _packed(w_hr, H, Hr, True, 1, 4, nth_max) if proj else Wb[:0]      # dhu = dh W_hr
    Wn, vs = Wb[:0], (e2, e2, e2, e2, e2, e2, e2, e2, e2, e2)
    if var is not None:
        w_n, ln_w, lnc_w = var[0], var[1], var[3]
        Wn = _packed(w_n, Hr, H, True, 1, 4, nth_max) if hs > 0 else Wb[:0]     # d(r h_in) = d_n W_hn
        # dnew, ddir: the gradient reaching h_new and zoneout's direct part; dhu = dnew W_hr;
        # dhin: h_in's; dv (cell layer norm): c_new's through hu; dtmp: the layer norm's input
        # (not in place); dpn, drh: d_n and d(r h_in); gh0, gc0: the initial state's from resets
        vs = (np.empty((B, Hr), dt), np.empty((B, Hr), dt), np.empty((B, H if proj else 0), dt),
              np.empty((B, Hr), dt), np.empty((B, H if lnc_w.shape[0] > 0 else 0), dt),
              np.empty((B, G if ln_w.shape[0] > 0 else 0), dt), np.empty((B, hs), dt), np.empty((B, hs), dt),
              np.zeros((B, Hr), dt), np.zeros((B, dc.shape[1]), dt))
    tg, mg = np.int64(0), np.int64(0)    # the step visited before (its gradient through W_hh reaches dh), its rows
    for s in range(T):
        t = s if reverse else T - 1 - s
        m = batch_sizes[t]
        tp = t + 1 if reverse else t - 1    # the state each row started step t from: step tp's or the initial one
        m_prev = (batch_sizes[tp] if tp < T else 0) if reverse else (m if t > 0 else 0)
        step = (m, t, tp, m_prev, tg, mg)
        Wd = (Wb, e2, e2, e2, NO)
        if var is None:
            nth = _threads(max(mg, m) * G * Hr, Wb.shape[0], nth_max, min_macs)
            if not proj:
                _run_bwd(PH_STEP, nth, cell, step, Wd, S, O, st, var, vs)
            else:
                _run_bwd(PH_PROJ_DH, nth, cell, step, Wd, S, O, st, var, vs)
                nth = _threads(m * H * Hr, Wu.shape[0], nth_max, min_macs)
                _run_bwd(PH_STEP, nth, cell, step, (Wu, e2, e2, e2, NO), S, O, st, var, vs)
        else:
            dnew, ddir, dhu, dhin, dv, dtmp, dpn, drh, gh0, gc0 = vs
            nth = _threads(m * G * Hr, Wb.shape[0], nth_max, min_macs)
            if proj:
                _run_bwd(PH_PRE, nth, cell, step, Wd, S, O, st, var, vs)
                _run_bwd(PH_GEMM, nth, cell, step, (Wu, dnew, dhu, e2, NO), S, O, st, var, vs)
            _run_bwd(PH_CELL, nth, cell, step, Wd, S, O, st, var, vs)
            if hs > 0:
                _run_bwd(PH_GEMM, nth, cell, step, (Wn, dpn, drh, e2, NO), S, O, st, var, vs)
                _run_bwd(PH_R, nth, cell, step, Wd, S, O, st, var, vs)
            _run_bwd(PH_GEMM, nth, cell, step, (Wb, grad_hw[t], dhin, e2, hs > 0), S, O, st, var, vs)
            # the last row phase is a few adds per unit: cheaper on this thread than a fork/join
            _run_bwd(PH_FINISH, ONE_THREAD, cell, step, Wd, S, O, st, var, vs)
        if m < B:
            grad_xw[t, m:] = 0
            grad_hw[t, m:] = 0
            if proj:
                grad_hproj[t, m:] = 0
        tg, mg = t, m
    if var is None:   # the first step's gradient through W_hh reaches h0
        nth = _threads(mg * G * Hr, Wb.shape[0], nth_max, min_macs)
        _run_bwd(PH_GEMM, nth, cell, (mg, tg, tg, mg, tg, mg), (Wb, grad_hw[tg], dh, e2, cell == GRU), S, O, st,
                 var, vs)
    else:   # the reset steps' share of the initial state's gradient
        dh += vs[8]
        if cell == LSTM:
            dc += vs[9]


@jit(**_JIT)
def rnn_backward_var(nth_max, min_macs, cell, grad_h_seq, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved, dh, dc,
                     out, var):
    """``rnn_backward`` with a variant: its own entry point, as ``rnn_forward_var``."""
    rnn_backward(nth_max, min_macs, cell, grad_h_seq, w_hh, w_hr, h0, c0, batch_sizes, reverse, saved, dh, dc, out,
                 var)


# ---------------------------------------------------------------------------------------------
# The op code's big GEMMs (input projection, grad_x, weight gradients), on the same threads as
# the recurrence: a second thread pool (torch's OpenMP) spins for milliseconds after each of
# its parallel regions and would compete with the recurrence for the cores.
# ---------------------------------------------------------------------------------------------
GEMM_ROW_BLOCK = 96   # rows of A whose tiles stay in L2 while all panels of B' pass by
GEMM_K_CHUNK = 256    # depth per pass: keeps a strided A (mm_tn) and a W chunk in L2


@jit(**_JIT_INLINE)
def _store_row(S, r, out, row, n0, nn, bias, has_bias, accumulate):
    """out[row, n0 + u] (+)= S[r, u] (+ bias[n0 + u]) for u < nn (unsigned indices: vectorised)."""
    if accumulate:
        for u in range(nn):
            out[row, n0 + u] += S[r, u]
    elif has_bias:
        for u in range(nn):
            out[row, n0 + u] = S[r, u] + bias[n0 + u]
    else:
        for u in range(nn):
            out[row, n0 + u] = S[r, u]


@jit(**_JIT_INLINE)
def _gemm_rows(r_lo, r_hi, a, a_rs, a_ks, K, N, Wflat, ldw, direct, bias, has_bias, out):
    """Rows [r_lo, r_hi) of gemm's out, GEMM_K_CHUNK deep at a time, as register tiles against
    every panel of B' (Wflat: packed panels, or B_mat itself when ``direct``). Inlined into
    both loops of gemm: called as a function it ran 20-30% slower (measured, one thread)."""
    L = VEC_BYTES // out.itemsize
    P = (N + 4 * L - 1) // (4 * L)
    S = np.empty((MR4, 4 * L), out.dtype)
    n_tiles, base, extra = _row_tiles(r_hi - r_lo, MR4)
    for k0 in range(0, K, GEMM_K_CHUNK):
        kc = min(GEMM_K_CHUNK, K - k0)
        for p in range(P):
            n0 = p * 4 * L
            nn = U(min(4 * L, N - n0))
            w_off = k0 * N + n0 if direct else (p * K + k0) * 4 * L
            r0 = r_lo
            for tile in range(n_tiles):
                mr = base + (1 if tile < extra else 0)
                tile_gemm(a, r0 * a_rs + k0 * a_ks, a_rs, a_ks, mr, Wflat, w_off, ldw, S, 0, 4 * L, L,
                          kc, 4, MR4)
                for r in range(mr):
                    _store_row(S, U(r), out, U(r0 + r), U(n0), nn, bias, has_bias, k0 > 0)
                r0 += mr


@jit(**_JIT_PARALLEL)
def gemm(nth, a, a_rs, a_ks, M, B_mat, trans_b, bias, out):
    """out [M, N] = A @ B' (+ bias): A[r, k] = a[r*a_rs + k*a_ks] (``a`` flat, so A may be a
    transposed view); B' = B_mat^T for B_mat [N, K], or B_mat [K, N] itself if ``trans_b``;
    bias [N] or empty; nth: threads (1: no parallel region). B' is packed into plain panels
    unless it is B_mat [K, N] with N a multiple of the panel width (then its rows already are
    panel rows); then row blocks of A (``_gemm_rows``) run in parallel."""
    N = out.shape[1]
    K = B_mat.shape[0] if trans_b else B_mat.shape[1]
    L = VEC_BYTES // out.itemsize
    direct = trans_b and N % (4 * L) == 0
    W = np.empty((0, K, 4 * L), out.dtype) if direct else _packed(B_mat, N, K, trans_b, 1, 4, nth)
    Wflat = B_mat.reshape(-1) if direct else W.reshape(-1)
    ldw = N if direct else 4 * L
    has_bias = bias.shape[0] > 0
    # at least one block per thread, blocks of at most GEMM_ROW_BLOCK rows, balanced
    nblk = max((M + GEMM_ROW_BLOCK - 1) // GEMM_ROW_BLOCK, min(nth, (M + MR4 - 1) // MR4))
    if nth == 1:
        for blk in range(nblk):
            _gemm_rows(blk * M // nblk, (blk + 1) * M // nblk, a, a_rs, a_ks, K, N, Wflat, ldw, direct, bias,
                       has_bias, out)
    else:
        for blk in prange(nblk):
            _gemm_rows(blk * M // nblk, (blk + 1) * M // nblk, a, a_rs, a_ks, K, N, Wflat, ldw, direct, bias,
                       has_bias, out)
    if K == 0:
        for r in range(M):
            for n in range(N):
                out[r, n] = bias[n] if has_bias else 0
