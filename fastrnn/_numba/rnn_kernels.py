r"""Numba kernels of the recurrence: one layer, one direction, the whole sequence per call.

The time loop runs here, in compiled code. Shape letters as in ``fastrnn.ops.recurrence``.

Per step (forward)::

    for each thread's share of the hidden units, in groups of UNIT_GROUP units:
        for each tile of up to MR active rows:
            S[MR, gates, units] = h_{t-1}[rows] @ W_hh^T[:, those units' gate columns]   (tile_gemm)
            fused cell step on S + xw_t + b_hh for those rows and units                  (*_fwd_units)

so each unit's gate pre-activations are turned into the new state while they are still in
L1, and a thread only ever reads the part of ``W_hh`` that belongs to its own units (which
stays in its core's L2 from one step to the next). Backward is the same with ``W_hh`` not
transposed: ``dh_{t-1}[rows, units] = grad_gates_t[rows] @ W_hh[:, units]``, then the fused
cell backward for those units. A step is one parallel region (``prange`` over threads; two
with a projection ``W_hr``); small steps run on one thread.

``tile_gemm`` is a register-blocked GEMM micro-kernel written directly in LLVM IR (an
``@intrinsic``): MR rows x NV vectors of accumulators (24 AVX-512 registers), one broadcast
and NV vector FMAs per row and k; it runs at about 235 GF/s on one core here, the FMA peak.
Numba cannot express that with loops (LLVM does not keep a local accumulator array in
registers), and scipy's BLAS, the obvious alternative, measured 76-94 GF/s on the per-step
shapes (it re-packs ``W_hh`` on every call, and this machine pins it to its AVX2 kernels with
``OPENBLAS_CORETYPE=Haswell``), 5 GF/s at batch 1. The weights are packed once per call into
panels ``[P, K, NV*L]`` (L = lanes, see ``pack_panel``). ``gemm`` runs the op code's big GEMMs
(input projection, grad_x, weight gradients) on the same micro-kernel and threads.

The variants of docs/variants.md (layer norm, peephole, recurrent dropout, zoneout, resets,
GRU reset_after=False) have their own kernels, ``rnn_forward_var`` / ``rnn_backward_var``, at
the end of this file (see the comment there for their phase structure); the plain kernels
above do not know about them.

Kernel arguments are numpy arrays (zero-copy views of torch tensors), all C-contiguous, all of
one float dtype (float32 or float64: one compiled signature each). Absent optional inputs are
passed as empty arrays of the right rank, so that every call of a kernel has the same types.

Numerics
--------
- float32: sigmoid and tanh are computed by ``_exp_f32`` (range reduction to
  ``[-ln2/2, ln2/2]``, degree-7 polynomial, scale by ``2^k`` built from the exponent bits): about
  2 ulp, and, unlike libm's ``expf``, a loop of it vectorises (Numba has no vector math library
  without Intel SVML). NaN propagates: every clamp is written so that a NaN fails the comparison
  and passes through unchanged, and no fast-math flag other than ``contract`` (fused
  multiply-add) is used, so the compiler may not assume finite values.
- float64: libm's ``exp`` and ``tanh`` (``gradcheck`` and the 1e-10 tolerance need them).
- sigmoid uses ``1 / (1 + exp(-x))`` with ``exp`` clamped to the finite range (no overflow,
  no cancellation); tanh uses ``(1 - e) / (1 + e)``, ``e = exp(-2|x|)``, and an odd polynomial
  below ``|x| < 0.25`` where that form would cancel.
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
                a_rk = builder.load(builder.gep(a_ptr, [builder.add(builder.mul(const(r), lda_), builder.mul(k, ldk_))]))
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
# Activations. float32: vectorisable polynomial exp; float64: libm.
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
_ONE32, _TWO32 = _F(1.0), _F(2.0)
_EXP_LO, _EXP_HI = _F(-87.0), _F(88.0)          # 2^k stays a normal float32
_ROUND = _F(12582912.0)                           # 1.5 * 2^23: adding it rounds to an integer
_ROUND_BITS = np.int32(np.array([12582912.0], np.float32).view(np.int32)[0])
_LOG2E = _F(1.4426950408889634)
_LN2_HI, _LN2_LO = _F(0.693359375), _F(-2.12194440e-4)  # ln 2 split so that k * _LN2_HI is exact
_P = tuple(_F(1.0 / math.factorial(n)) for n in range(8))  # Taylor; |r| <= ln2/2: error < 2e-9
_T3, _T5, _T7, _T9 = _F(-1 / 3), _F(2 / 15), _F(-17 / 315), _F(62 / 2835)
_TANH_SMALL = _F(0.25)


@jit(**_JIT)
def _exp_f32(y):
    # Clamps written as "if y < lo" so that NaN passes through (it fails both comparisons).
    if y < _EXP_LO:
        y = _EXP_LO
    if y > _EXP_HI:
        y = _EXP_HI
    t = y * _LOG2E + _ROUND          # k = round(y / ln 2) sits in the low mantissa bits of t
    k = t - _ROUND
    r = y - k * _LN2_HI
    r = r - k * _LN2_LO              # |r| <= ln2 / 2
    p = ((((((_P[7] * r + _P[6]) * r + _P[5]) * r + _P[4]) * r + _P[3]) * r + _P[2]) * r + _P[1]) * r + _P[0]
    scale = _bits_f32((_f32_bits(t) - _ROUND_BITS + np.int32(127)) << np.int32(23))
    return p * scale


@jit(**_JIT)
def _sigmoid_f32(x):
    return _ONE32 / (_ONE32 + _exp_f32(-x))


@jit(**_JIT)
def _tanh_f32(x):
    a = abs(x)
    e = _exp_f32(-_TWO32 * a)
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


def sigmoid(x):
    """Logistic function of a float32 or float64 scalar (compiled by the overload below)."""
    raise NotImplementedError("only callable from numba-compiled code")


def tanh(x):
    """Hyperbolic tangent of a float32 or float64 scalar (compiled by the overload below)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(sigmoid, jit_options=_JIT_OVERLOAD)
def _sigmoid_overload(x):
    if x == types.float32:
        return lambda x: _sigmoid_f32(x)
    return lambda x: _sigmoid_f64(x)


@overload(tanh, jit_options=_JIT_OVERLOAD)
def _tanh_overload(x):
    if x == types.float32:
        return lambda x: _tanh_f32(x)
    return lambda x: math.tanh(x)


# ---------------------------------------------------------------------------------------------
# Fused cell steps on ``nu`` consecutive hidden units ``j = J .. J+nu-1`` of one batch row.
# Arguments are whole 2-D arrays with a row index and, for gate rows, ``v * H + j`` column
# offsets (the scratch tile ``S`` at ``v * UG + u``, u = j - J). All indices are unsigned:
# Numba then emits no negative-index wraparound and the addresses are affine in the loop
# index, so LLVM vectorises the loop (row views would cost reference counting per call:
# measured 3-5 instead of 1.5 ns per LSTM unit). Gate outputs go to the scratch row ``O`` at
# constant offsets ``v * UG`` and are copied to the gate-strided destination afterwards:
# stores into one array at the runtime offsets ``v * H`` keep LLVM from vectorising (it cannot
# rule out that they overlap), which measured 11x slower. The helpers are inlined.
# Forward: pre-activations in, activated gates out. Backward: saved activations in,
# pre-activation gradients out; each activation's derivative is written in terms of its
# output: sigmoid' = s (1 - s), tanh' = 1 - t^2.
# ---------------------------------------------------------------------------------------------
U = np.uint64
UG, UG2, UG3 = U(UNIT_GROUP), U(2 * UNIT_GROUP), U(3 * UNIT_GROUP)


@jit(**_JIT_INLINE)
def lstm_fwd_units(save, nu, S, r, X, b, H, J, bh, C, C_out, Hu, O):
    """S[r]: h_{t-1} W_hh^T of these units (gate-major, UG apart); X[b]: xw_t; bh: b_hh;
    C[b]: c_{t-1} in, c_t out; Hu[b] <- o * tanh(c_t). If ``save`` (training): activated
    i, f, g, o -> O, c_t -> C_out[b]."""
    for u in range(nu):
        j = J + u
        i = sigmoid(X[b, j] + S[r, u] + bh[j])
        f = sigmoid(X[b, H + j] + S[r, UG + u] + bh[H + j])
        g = tanh(X[b, H + H + j] + S[r, UG2 + u] + bh[H + H + j])
        o = sigmoid(X[b, H + H + H + j] + S[r, UG3 + u] + bh[H + H + H + j])
        c_new = f * C[b, j] + i * g
        C[b, j] = c_new
        Hu[b, j] = o * tanh(c_new)
        if save:
            O[u], O[UG + u], O[UG2 + u], O[UG3 + u] = i, f, g, o
            C_out[b, j] = c_new


@jit(**_JIT_INLINE)
def gru_fwd_units(save, nu, S, r, X, b, H, J, bh, H_prev, HN, H_out, O):
    """S[r]: h_{t-1} W_hh^T of these units (gate-major, UG apart); X[b]: input-side
    pre-activations; bh: b_hh; H_prev[b]: h_{t-1}; H_out[b] <- h_t. If ``save``: activated
    r, z, n -> O, W_hn h_{t-1} + b_hn -> HN[b]."""
    one = X.dtype.type(1)
    for u in range(nu):
        j = J + u
        h_n = S[r, UG2 + u] + bh[H + H + j]
        rg = sigmoid(X[b, j] + S[r, u] + bh[j])
        z = sigmoid(X[b, H + j] + S[r, UG + u] + bh[H + j])
        n = tanh(X[b, H + H + j] + rg * h_n)
        H_out[b, j] = (one - z) * n + z * H_prev[b, j]
        if save:
            O[u], O[UG + u], O[UG2 + u] = rg, z, n
            HN[b, j] = h_n


@jit(**_JIT_INLINE)
def rnn_fwd_units(relu, nu, S, r, X, b, J, bh, H_out):
    """H_out[b, j] <- act(X[b, j] + S[r, u] + bh[j]); relu keeps NaN (a NaN fails ``v < 0``)."""
    zero = X.dtype.type(0)
    for u in range(nu):
        j = J + u
        v = X[b, j] + S[r, u] + bh[j]
        if relu:
            H_out[b, j] = zero if v < zero else v
        else:
            H_out[b, j] = tanh(v)


@jit(**_JIT_INLINE)
def lstm_bwd_units(nu, A, b, H, J, C, C_prev, bp, D, bd, d0, GS, bs, DC, O):
    """A[b]: saved i, f, g, o; C[b], C_prev[bp]: c_t, c_{t-1}; ``D[bd, d0 + u] + GS[bs, j]``: the
    gradient reaching o * tanh(c_t); DC[b]: gradient reaching c_t from step t+1 in, reaching
    c_{t-1} out; O <- the four pre-activation gradients (UG apart)."""
    one = A.dtype.type(1)
    for u in range(nu):
        j = J + u
        i, f, g, o = A[b, j], A[b, H + j], A[b, H + H + j], A[b, H + H + H + j]
        dhu = D[bd, d0 + u] + GS[bs, j]
        tc = tanh(C[b, j])
        dc_t = DC[b, j] + dhu * o * (one - tc * tc)
        O[u] = dc_t * g * i * (one - i)
        O[UG + u] = dc_t * C_prev[bp, j] * f * (one - f)
        O[UG2 + u] = dc_t * i * (one - g * g)
        O[UG3 + u] = dhu * tc * o * (one - o)
        DC[b, j] = dc_t * f


@jit(**_JIT_INLINE)
def gru_bwd_units(nu, A, b, H, J, HN, H_prev, bp, DH, GS, O):
    """A[b]: saved r, z, n; HN[b]: saved W_hn h_{t-1} + b_hn; H_prev[bp]: h_{t-1}; DH[b]: the
    gradient reaching h_t from step t+1 in (GS[b] from the output is added), its direct part
    ``dh_t * z`` out; O <- dr, dz, dn (input side) and, at 3 UG, ``dn * r`` (the hidden side
    n gradient; r and z are the same on both sides)."""
    one = A.dtype.type(1)
    for u in range(nu):
        j = J + u
        r, z, n = A[b, j], A[b, H + j], A[b, H + H + j]
        d = DH[b, j] + GS[b, j]
        d_n = d * (one - z) * (one - n * n)
        O[u] = d_n * HN[b, j] * r * (one - r)
        O[UG + u] = d * (H_prev[bp, j] - n) * z * (one - z)
        O[UG2 + u] = d_n
        O[UG3 + u] = d_n * r
        DH[b, j] = d * z


@jit(**_JIT_INLINE)
def rnn_bwd_units(relu, nu, Hs, b, J, DH, GS, GX):
    """Hs[b]: h_t; the gradient reaching h_t is DH[b] + GS[b]; GX[b] <- pre-activation
    gradient. relu selects rather than multiplies by 0/1, so a NaN gradient stays out of units
    that relu switched off (as torch's threshold_backward)."""
    one, zero = Hs.dtype.type(1), Hs.dtype.type(0)
    for u in range(nu):
        j = J + u
        d = DH[b, j] + GS[b, j]
        if relu:
            GX[b, j] = d if Hs[b, j] > zero else zero
        else:
            GX[b, j] = d * (one - Hs[b, j] * Hs[b, j])


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
def fwd_chunk(cell, save, p0, p1, m, proj, Wf, h_in, x_t, b_hh, c_state, c_out, hu_t, hn_t, h_out, h_seq_t, S, O):
    """Forward step for the units of panels [p0, p1) of ``Wf`` and active rows [0, m).

    save: training (keep activated gates and per-step states for backward);
    h_in [B, Hr]: h_{t-1};  x_t [B, G]: xw_t in, activated gates out (if save);  c_state [B, H]: c (LSTM);
    c_out [B, H] <- c_t (LSTM);  hn_t [B, H] <- W_hn h_{t-1} + b_hn (GRU);
    hu_t [B, H] <- o * tanh(c_t) (LSTM; it is h_seq_t itself when there is no projection);
    h_seq_t [B, Hr] <- h_t and h_out [B, Hr] <- h_t, except for LSTM with a projection
    (then ``gemm_chunk`` writes them from hu_t). S: this thread's scratch tile; O: its scratch
    row [4 * UNIT_GROUP] for gate outputs."""
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
            uJ, unu, uH = U(J), U(nu), U(H)
            for r in range(mr):
                b, ur = U(r0 + r), U(r)
                if cell == LSTM:
                    lstm_fwd_units(save, unu, S, ur, x_t, b, uH, uJ, b_hh, c_state, c_out, hu_t, O)
                elif cell == GRU:
                    gru_fwd_units(save, unu, S, ur, x_t, b, uH, uJ, b_hh, h_in, hn_t, h_seq_t, O)
                else:
                    rnn_fwd_units(cell == RNN_RELU, unu, S, ur, x_t, b, uJ, b_hh, h_seq_t)
                if save and gate_layout:
                    _scatter_gates(O, U(0), U(nv), x_t, b, uH, uJ, unu)
                if not proj:
                    _copy_units(h_seq_t, b, h_out, uJ, unu)
            r0 += mr


@jit(**_JIT_INLINE)
def _store_units(S, r, out, b, J, nu, accumulate):
    """out[b, J + u] (+)= S[r, u] for u < nu."""
    if accumulate:
        for u in range(nu):
            out[b, J + u] += S[r, u]
    else:
        for u in range(nu):
            out[b, J + u] = S[r, u]


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
            _store_units(S, U(r), out_a, U(r0 + r), uJ, unu, accumulate)
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
def bwd_chunk(cell, p0, p1, m_g, g_in, Wb, m, gs_t, a_t, c_t, prev, init, m_prev, dc, hn_t, h_t,
              dh, gx_t, gh_t, S, O):
    """Backward step for the units of panels [p0, p1) of ``Wb`` (no projection: Hr = H).

    First ``dh[:m_g] (+)= g_in[:m_g] @ W_hh`` for these units (g_in: the previous step's
    grad_xw, or grad_hw for GRU, which accumulates onto its direct part ``dh * z``); then the
    cell backward for rows [0, m), where the gradient reaching h_t is ``dh + gs_t``.
    a_t [B, G]: saved gates; c_t [B, H]: c_t (LSTM); prev / init [B, H]: c_{t-1} (LSTM) or
    h_{t-1} (GRU) for rows < m_prev / the initial state for the others; dc [B, H] (LSTM);
    hn_t [B, H] (GRU); h_t [B, H] (RNN); gx_t, gh_t [B, G] <- gradients; S, O: scratch."""
    H = dh.shape[1]
    upp = Wb.shape[2]
    ppg = UNIT_GROUP // upp
    empty = dh[:0]
    for g0 in range(p0, p1, ppg):
        g1 = min(g0 + ppg, p1)
        if m_g > 0:
            _gemm_group(g0, g1, m_g, Wb, g_in, S, dh, empty, cell == GRU)
        J = g0 * upp
        nu = min(g1 * upp, H) - J
        uJ, unu, uH = U(J), U(nu), U(H)
        for bi in range(m):
            b = U(bi)
            if cell == LSTM:
                lstm_bwd_units(unu, a_t, b, uH, uJ, c_t, prev if bi < m_prev else init, b, dh, b, uJ, gs_t, b,
                               dc, O)
                _scatter_gates(O, U(0), U(4), gx_t, b, uH, uJ, unu)
            elif cell == GRU:
                gru_bwd_units(unu, a_t, b, uH, uJ, hn_t, prev if bi < m_prev else init, b, dh, gs_t, O)
                _scatter_gates(O, U(0), U(3), gx_t, b, uH, uJ, unu)
                _scatter_gates(O, U(0), U(2), gh_t, b, uH, uJ, unu)
                _scatter_gates(O, UG3, U(1), gh_t, b, uH, uJ + U(2) * uH, unu)
            else:
                rnn_bwd_units(cell == RNN_RELU, unu, h_t, b, uJ, dh, gs_t, gx_t)


@jit(**_JIT)
def lstm_proj_bwd_chunk(p0, p1, m, Wu, dh, a_t, c_t, prev, init, m_prev, zeros, dc, gx_t, S, O):
    """LSTM with a projection, second half of a backward step: for the H-units of panels
    [p0, p1) of ``Wu`` (W_hr packed), ``dhu = dh[:m] @ W_hr`` into the scratch tile, then the
    cell backward with it (``zeros`` [1, H]: dh already holds the output gradient)."""
    H = c_t.shape[1]
    upp = Wu.shape[2]
    L = upp // 4
    ppg = UNIT_GROUP // upp
    n_tiles, base, extra = _row_tiles(m, MR4)
    for g0 in range(p0, p1, ppg):
        g1 = min(g0 + ppg, p1)
        J = g0 * upp
        nu = min(g1 * upp, H) - J
        r0 = 0
        for tile in range(n_tiles):
            mr = base + (1 if tile < extra else 0)
            for p in range(g0, g1):
                _gemm_tile(dh, r0, mr, Wu, p, S, (p - g0) * upp, L, 4)
            uJ, unu, uH, z0 = U(J), U(nu), U(H), U(0)
            for r in range(mr):
                bi = r0 + r
                b = U(bi)
                lstm_bwd_units(unu, a_t, b, uH, uJ, c_t, prev if bi < m_prev else init, b, S, U(r), z0,
                               zeros, z0, dc, O)
                _scatter_gates(O, z0, U(4), gx_t, b, uH, uJ, unu)
            r0 += mr


@jit(**_JIT)
def proj_grad_rows(J0, J1, m, dh, gs_t, ghp_t):
    """dh[:m, J0:J1] += gs_t (the output gradient), recorded in ghp_t (for grad_w_hr)."""
    for b in range(m):
        d, g, o = dh[b], gs_t[b], ghp_t[b]
        for j in range(J0, J1):
            d[j] += g[j]
            o[j] = d[j]


# ---------------------------------------------------------------------------------------------
# Whole-sequence kernels
# ---------------------------------------------------------------------------------------------
@jit(**_JIT)
def _threads(macs, panels, nth_max, min_macs):
    """Threads for one step: one when the step is too small to repay a parallel region."""
    if macs < min_macs or nth_max < 2:
        return 1
    return min(nth_max, panels)


@jit(**_JIT)
def _copy_rows(src, dst, r0, r1):
    for b in range(r0, r1):
        for k in range(src.shape[1]):
            dst[b, k] = src[b, k]


@jit(**_JIT)
def _zero_rows(a, r0):
    for b in range(r0, a.shape[0]):
        for k in range(a.shape[1]):
            a[b, k] = 0


# Every parallel loop below has a serial twin taken when the call may use one thread
# (nth / nth_max == 1): a fork child must open no parallel region at all (runtime.py), and a
# one-thread region would only cost its fork/join.
@jit(**_JIT_PARALLEL)
def _packed_forward_weights(cell, w_hh, H, dtype_probe, nth):
    L = VEC_BYTES // dtype_probe.itemsize
    gate_layout = cell == LSTM or cell == GRU
    nv = 3 if cell == GRU else 4
    upp = L if gate_layout else nv * L
    W = np.empty(((H + upp - 1) // upp, w_hh.shape[1], nv * L), w_hh.dtype)
    if nth == 1:
        for p in range(W.shape[0]):
            pack_panel(w_hh, False, nv if gate_layout else 1, H, nv, W, p)
    else:
        for p in prange(W.shape[0]):
            pack_panel(w_hh, False, nv if gate_layout else 1, H, nv, W, p)
    return W


@jit(**_JIT_PARALLEL)
def _packed_plain(M, units, K, trans, nth):
    """Pack for ``y = x @ M'`` with ``units`` output columns, K inputs (see pack_panel); in
    parallel unless nth == 1."""
    L = VEC_BYTES // M.itemsize
    W = np.empty(((units + 4 * L - 1) // (4 * L), K, 4 * L), M.dtype)
    if nth == 1:
        for p in range(W.shape[0]):
            pack_panel(M, trans, 1, units, 4, W, p)
    else:
        for p in prange(W.shape[0]):
            pack_panel(M, trans, 1, units, 4, W, p)
    return W


@jit(**_JIT_PARALLEL)
def rnn_forward(nth_max, min_macs, cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training,
                h_seq, h_state, c_state, c_seq, hu_seq, hn_seq):
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
    h_seq       [T, B, Hr] out (zero on inactive rows)
    h_state     [B, Hr] out: h_T;  c_state [B, H] out: c_T (LSTM, else empty)
    c_seq       [T, B, H] out when training (LSTM: c_t), else [1, B, H] scratch; empty otherwise
    hu_seq      [T, B, H] out when training (LSTM with projection: o * tanh(c_t)), else [1, B, H]
                scratch; empty when there is no projection
    hn_seq      [T, B, H] out when training (GRU: W_hn h_{t-1} + b_hn), else [1, B, H] scratch
    """
    T, B, G = xw.shape
    Hr = w_hh.shape[1]
    proj = w_hr.shape[0] > 0
    H = G // 4 if cell == LSTM else (G // 3 if cell == GRU else G)
    Wf = _packed_forward_weights(cell, w_hh, H, xw, nth_max)
    P = Wf.shape[0]
    Wr = _packed_plain(w_hr, Hr, H, False, nth_max) if proj else Wf[:0]
    Pr = Wr.shape[0]
    S = np.empty((nth_max, max(MR3, MR4), 4 * UNIT_GROUP), xw.dtype)   # per thread: GEMM tile
    O = np.empty((nth_max, 4 * UNIT_GROUP), xw.dtype)                   # and gate-output row
    hbuf = np.empty((2, B, Hr), xw.dtype)
    _copy_rows(h0, hbuf[0], 0, B)
    if cell == LSTM:
        _copy_rows(c0, c_state, 0, B)
    none2 = h_state[:0]
    for s in range(T):
        t = T - 1 - s if reverse else s
        m = batch_sizes[t]
        ts = t if training else 0
        h_in, h_out = hbuf[s % 2], hbuf[(s + 1) % 2]
        x_t, h_seq_t = xw[t], h_seq[t]
        c_out = c_seq[ts] if cell == LSTM else none2
        hu_t = hu_seq[ts] if proj else h_seq_t
        hn_t = hn_seq[ts] if cell == GRU else none2
        nth = _threads(m * G * Hr, P, nth_max, min_macs)
        if nth == 1:
            fwd_chunk(cell, training, 0, P, m, proj, Wf, h_in, x_t, b_hh, c_state, c_out, hu_t, hn_t, h_out, h_seq_t, S[0], O[0])
        else:
            for c in prange(nth):
                fwd_chunk(cell, training, c * P // nth, (c + 1) * P // nth, m, proj, Wf, h_in, x_t, b_hh, c_state,
                          c_out, hu_t, hn_t, h_out, h_seq_t, S[c], O[c])
        if proj:
            nth = _threads(m * H * Hr, Pr, nth_max, min_macs)
            if nth == 1:
                gemm_chunk(0, Pr, m, Wr, hu_t, S[0], h_out, h_seq_t, False)
            else:
                for c in prange(nth):
                    gemm_chunk(c * Pr // nth, (c + 1) * Pr // nth, m, Wr, hu_t, S[c], h_out, h_seq_t, False)
        if m < B:  # finished rows keep their state; their outputs are zero
            _copy_rows(h_in, h_out, m, B)
            _zero_rows(h_seq_t, m)
            if training:
                _zero_rows(x_t, m)
            if training and cell == LSTM:
                _zero_rows(c_out, m)
                if proj:
                    _zero_rows(hu_t, m)
            if training and cell == GRU:
                _zero_rows(hn_t, m)
    _copy_rows(hbuf[T % 2], h_state, 0, B)


@jit(**_JIT_PARALLEL)
def rnn_backward(nth_max, min_macs, cell, grad_h_seq, w_hh, w_hr, h0, c0, batch_sizes, reverse,
                 h_seq, acts, c_seq, hn_seq, dh, dc, grad_xw, grad_hw, grad_hproj):
    """Backward recurrence over all T steps (the forward's steps in the opposite order).

    nth_max, min_macs: as in rnn_forward
    grad_h_seq  [T, B, Hr];  w_hh [G, Hr];  w_hr [Hr, H] or empty;  h0 [B, Hr];  c0 [B, H] or empty
    h_seq, acts, c_seq, hn_seq: what the forward saved (acts/c_seq/hn_seq empty where unused)
    dh          [B, Hr]  in: grad_h_T;  out: grad_h0
    dc          [B, H]   in: grad_c_T;  out: grad_c0 (LSTM, else empty)
    grad_xw     [T, B, G] out;  grad_hw [T, B, G] out (GRU; the same array as grad_xw otherwise)
    grad_hproj  [T, B, Hr] out: gradient reaching each projected h_t (LSTM with projection)
    """
    T, B, G = grad_xw.shape
    Hr = w_hh.shape[1]
    proj = w_hr.shape[0] > 0
    H = G // 4 if cell == LSTM else (G // 3 if cell == GRU else G)
    Wb = _packed_plain(w_hh, Hr, G, True, nth_max)   # dh = grad_gates @ W_hh
    Pb = Wb.shape[0]
    Wu = _packed_plain(w_hr, H, Hr, True, nth_max) if proj else Wb[:0]   # dhu = dh @ W_hr
    Pu = Wu.shape[0]
    upp = Wb.shape[2]
    zeros = np.empty((1, H), grad_xw.dtype)
    _zero_rows(zeros, 0)   # not np.zeros: in a parallel kernel that is a parallel region of its own
    S = np.empty((nth_max, max(MR3, MR4), 4 * UNIT_GROUP), grad_xw.dtype)
    O = np.empty((nth_max, 4 * UNIT_GROUP), grad_xw.dtype)
    g_src = grad_hw if cell == GRU else grad_xw      # what the step GEMM multiplies by W_hh
    none2 = dh[:0]
    t_last, m_last = 0, 0
    for s in range(T):
        t = s if reverse else T - 1 - s
        m = batch_sizes[t]
        # the state each row started step t from: step t-1's (t+1's in reverse) or the initial one
        t_prev = t + 1 if reverse else t - 1
        m_prev = (batch_sizes[t_prev] if t_prev < T else 0) if reverse else (m if t > 0 else 0)
        if cell == LSTM:
            prev, init = (c_seq[t_prev] if m_prev > 0 else c0), c0
        elif cell == GRU:
            prev, init = (h_seq[t_prev] if m_prev > 0 else h0), h0
        else:
            prev, init = none2, none2
        g_in = g_src[t_last]
        a_t = acts[t] if (cell == LSTM or cell == GRU) else none2
        c_t = c_seq[t] if cell == LSTM else none2
        hn_t = hn_seq[t] if cell == GRU else none2
        gs_t, gx_t, gh_t = grad_h_seq[t], grad_xw[t], grad_hw[t]
        if not proj:
            nth = _threads(max(m_last, m) * G * Hr, Pb, nth_max, min_macs)
            if nth == 1:
                bwd_chunk(cell, 0, Pb, m_last, g_in, Wb, m, gs_t, a_t, c_t, prev, init, m_prev, dc, hn_t,
                          h_seq[t], dh, gx_t, gh_t, S[0], O[0])
            else:
                for c in prange(nth):
                    bwd_chunk(cell, c * Pb // nth, (c + 1) * Pb // nth, m_last, g_in, Wb, m, gs_t, a_t, c_t,
                              prev, init, m_prev, dc, hn_t, h_seq[t], dh, gx_t, gh_t, S[c], O[c])
        else:
            ghp_t = grad_hproj[t]
            nth = _threads(max(m_last, m) * G * Hr, Pb, nth_max, min_macs)
            if nth == 1:
                gemm_chunk(0, Pb, m_last, Wb, g_in, S[0], dh, none2, False)
                proj_grad_rows(0, Hr, m, dh, gs_t, ghp_t)
            else:
                for c in prange(nth):
                    gemm_chunk(c * Pb // nth, (c + 1) * Pb // nth, m_last, Wb, g_in, S[c], dh, none2, False)
                    proj_grad_rows(min(c * Pb // nth * upp, Hr), min((c + 1) * Pb // nth * upp, Hr), m, dh,
                                   gs_t, ghp_t)
            nth = _threads(m * H * Hr, Pu, nth_max, min_macs)
            if nth == 1:
                lstm_proj_bwd_chunk(0, Pu, m, Wu, dh, a_t, c_t, prev, init, m_prev, zeros, dc, gx_t, S[0], O[0])
            else:
                for c in prange(nth):
                    lstm_proj_bwd_chunk(c * Pu // nth, (c + 1) * Pu // nth, m, Wu, dh, a_t, c_t, prev, init,
                                        m_prev, zeros, dc, gx_t, S[c], O[c])
            if m < B:
                _zero_rows(ghp_t, m)
        if m < B:
            _zero_rows(gx_t, m)
            if cell == GRU:
                _zero_rows(gh_t, m)
        t_last, m_last = t, m
    # the first step's gradient through W_hh reaches h0
    g_in = g_src[t_last]
    nth = _threads(m_last * G * Hr, Pb, nth_max, min_macs)
    if nth == 1:
        gemm_chunk(0, Pb, m_last, Wb, g_in, S[0], dh, none2, cell == GRU)
    else:
        for c in prange(nth):
            gemm_chunk(c * Pb // nth, (c + 1) * Pb // nth, m_last, Wb, g_in, S[c], dh, none2, cell == GRU)


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
    W = np.empty((0, K, 4 * L), out.dtype) if direct else _packed_plain(B_mat, N, K, trans_b, nth)
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


# ---------------------------------------------------------------------------------------------
# Variants beyond cuDNN (docs/variants.md): layer norm, peephole, recurrent dropout, zoneout,
# state resets, GRU reset_after=False. Separate kernels, so that the plain kernels above stay
# exactly as they are (and so that their compile time does not grow): these compile on the
# first call with a variant.
#
# A layer norm over all G entries of a row needs the whole row's product before any gate can
# be computed, so the per-unit fusion of the plain step does not apply. A variant step is a
# short sequence of phases, each one parallel region over numba's threads:
#
#   GEMM phases: panels of the packed weights split between threads (each thread's share of
#                W stays in its core's L2 across steps), register tiles as the plain path;
#   row phases:  batch rows split between threads; one pass over a row does its layer-norm
#                statistics, gate math, cell state, zoneout and what backward needs saved.
#
# Forward: [A = h_in W^T] -> rows (LN, cell)  [GRU reset_after=False: -> An = (r*h_in) W_hn^T
# -> rows (n, h)]  [projection: -> h_new = hu W_hr^T -> rows (zoneout)].
# Backward: rows (dh_new)  [projection: -> dhu = dh_new W_hr]  -> rows (cell backward, LN
# backward)  [GRU reset_after=False: -> d(r h_in) = d_n W_hn -> rows (d_r)]  -> dh_in = grad_hw
# W_hh -> rows (rec_mask, zoneout, reset). All phases run through one dispatcher
# (``_fwd_phase`` / ``_bwd_phase``) and a single ``prange`` per kernel, which keeps the number of
# outlined parallel regions (the dominant part of compile time) at one.
# Presence of each option is read off the array shapes (absent = empty array), which keeps one
# compiled signature per dtype; the branches are loop-invariant and sit outside the unit loops
# where it matters.
# ---------------------------------------------------------------------------------------------
_JIT_REASSOC = dict(_JIT, fastmath={"contract", "reassoc"})   # sums: vectorised; NaN still propagates


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


LN_EPS = 1e-5   # fastrnn.ops.recurrence.LN_EPS (not imported: this file must not depend on torch)


@jit(**_JIT)
def _hw_row(b, ts, n, A, bh, ln_w, ln_b, hat, rstd):
    """A[b, :n] (= h_in W^T) <- LN(A[b]; ln) + b_hh, saving the normalised row and its rstd
    at step slot ts; without layer norm A[b] + b_hh."""
    ub = U(b)
    if ln_w.shape[0] > 0:
        mean, rs = _ln_stats(A, b, n)
        rstd[ts, b] = rs
        ht = hat[ts]
        for k in range(U(n)):
            h = (A[ub, k] - mean) * rs
            ht[ub, k] = h
            A[ub, k] = h * ln_w[k] + ln_b[k] + bh[k]
    else:
        for k in range(U(n)):
            A[ub, k] += bh[k]


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
def _lstm_var_fwd_row(b, t, ts, H, X, A, C, peep, zc, cn, lnc_w, lnc_b, c_hat, c_rstd, c_seq, new_seq, hu, O):
    """LSTM step of row b: X[b] xw_t in, activated i, f, g, o out; A[b]: hw (after norm and
    bias); C[b]: c_prev in (reset applied), c_t out; cn [B, H] scratch <- c_new; hu[b] <- o tanh(y).
    Units go in groups of UNIT_GROUP through the scratch row O (see _scatter_gates: gate stores
    at runtime offsets v * H of one array would keep the loop scalar)."""
    has_peep, has_zc = peep.shape[0] > 0, zc.shape[0] > 0
    save_new = new_seq.shape[0] > 0
    ub, uH = U(b), U(H)
    cs = c_seq[ts]
    for J0 in range(0, H, UNIT_GROUP):
        J, nu = U(J0), U(min(UNIT_GROUP, H - J0))
        _lstm_var_fwd_units(ub, t, ts, uH, J, nu, X, A, C, peep, zc, cn, cs, new_seq, O, has_peep, has_zc, save_new)
        _scatter_gates(O, U(0), U(4), X, ub, uH, J, nu)
    _lstm_hu_row(b, ts, H, X, cn, lnc_w, lnc_b, c_hat, c_rstd, hu)


@jit(**_JIT_INLINE)
def _lstm_var_fwd_units(ub, t, ts, uH, J, nu, X, A, C, peep, zc, cn, cs, new_seq, O, has_peep, has_zc, save_new):
    """Units J .. J+nu-1 of _lstm_var_fwd_row: gates to O (UG apart), c_new to cn, c_t to C and cs."""
    one = X.dtype.type(1)
    for u in range(nu):
        j = J + u
        cp = C[ub, j]
        pi = X[ub, j] + A[ub, j]
        pf = X[ub, uH + j] + A[ub, uH + j]
        pg = X[ub, uH + uH + j] + A[ub, uH + uH + j]
        po = X[ub, uH + uH + uH + j] + A[ub, uH + uH + uH + j]
        if has_peep:
            pi += peep[0, j] * cp
            pf += peep[1, j] * cp
        i, f, g = sigmoid(pi), sigmoid(pf), tanh(pg)
        c_new = f * cp + i * g
        if has_peep:
            po += peep[2, j] * c_new
        o = sigmoid(po)
        O[u], O[UG + u], O[UG2 + u], O[UG3 + u] = i, f, g, o
        cn[ub, j] = c_new
        c_t = zc[t, ub, j] * cp + (one - zc[t, ub, j]) * c_new if has_zc else c_new
        C[ub, j] = c_t
        cs[ub, j] = c_t
        if save_new:
            new_seq[ts, ub, j] = c_new


@jit(**_JIT)
def _lstm_hu_row(b, ts, H, X, cn, lnc_w, lnc_b, c_hat, c_rstd, hu):
    """hu[b] <- o tanh(y), y = LN(c_new; ln_c) (saving c_hat, c_rstd at slot ts) or c_new."""
    ub, uH = U(b), U(H)
    if lnc_w.shape[0] > 0:
        mean, rs = _ln_stats(cn, b, H)
        c_rstd[ts, b] = rs
        ch = c_hat[ts]
        for j in range(uH):
            v = (cn[ub, j] - mean) * rs
            ch[ub, j] = v
            hu[ub, j] = X[ub, uH + uH + uH + j] * tanh(v * lnc_w[j] + lnc_b[j])
    else:
        for j in range(uH):
            hu[ub, j] = X[ub, uH + uH + uH + j] * tanh(cn[ub, j])


@jit(**_JIT)
def _gru_var_fwd_row(b, ts, H, X, A, hprev, hn_seq, hnew, O):
    """GRU (reset_after=True) step of row b: X[b] xw_t in, r, z, n out; A[b]: hw; hprev[b]:
    h_prev; hn_seq[ts, b] <- hw_n; hnew[b] <- (1-z) n + z h_prev. O: scratch row (gates)."""
    one = X.dtype.type(1)
    ub, uH = U(b), U(H)
    hn_t = hn_seq[ts]
    for J0 in range(0, H, UNIT_GROUP):
        J, nu = U(J0), U(min(UNIT_GROUP, H - J0))
        for u in range(nu):
            j = J + u
            hn = A[ub, uH + uH + j]
            r = sigmoid(X[ub, j] + A[ub, j])
            z = sigmoid(X[ub, uH + j] + A[ub, uH + j])
            n = tanh(X[ub, uH + uH + j] + r * hn)
            O[u], O[UG + u], O[UG2 + u] = r, z, n
            hn_t[ub, j] = hn
            hnew[ub, j] = (one - z) * n + z * hprev[ub, j]
        _scatter_gates(O, U(0), U(3), X, ub, uH, J, nu)


@jit(**_JIT)
def _gru_rz_fwd_row(b, H, X, A, hin, rh, O):
    """GRU reset_after=False, first half of row b: r, z into X[b]; rh[b] <- r * h_in."""
    ub, uH = U(b), U(H)
    for J0 in range(0, H, UNIT_GROUP):
        J, nu = U(J0), U(min(UNIT_GROUP, H - J0))
        for u in range(nu):
            j = J + u
            r = sigmoid(X[ub, j] + A[ub, j])
            O[u] = r
            O[UG + u] = sigmoid(X[ub, uH + j] + A[ub, uH + j])
            rh[ub, j] = r * hin[ub, j]
        _scatter_gates(O, U(0), U(2), X, ub, uH, J, nu)


@jit(**_JIT)
def _gru_n_fwd_row(b, ts, H, X, An, bh, hprev, hn_seq, hnew):
    """GRU reset_after=False, second half: An[b] = (r h_in) W_hn^T; n into X[b];
    hn_seq[ts, b] <- An + b_hn; hnew[b] <- (1-z) n + z h_prev."""
    one = X.dtype.type(1)
    ub, uH = U(b), U(H)
    hn_t = hn_seq[ts]
    for j in range(uH):
        hn = An[ub, j] + bh[uH + uH + j]
        n = tanh(X[ub, uH + uH + j] + hn)
        z = X[ub, uH + j]
        X[ub, uH + uH + j] = n
        hn_t[ub, j] = hn
        hnew[ub, j] = (one - z) * n + z * hprev[ub, j]


@jit(**_JIT)
def _rnn_var_fwd_row(b, ts, relu, H, X, A, hnew, new_seq):
    """RNN step of row b: hnew[b] <- act(X[b] + A[b]); saved as h_new (zoneout) if new_seq has rows."""
    zero = X.dtype.type(0)
    ub = U(b)
    for j in range(U(H)):
        v = X[ub, j] + A[ub, j]
        if relu:
            hnew[ub, j] = zero if v < zero else v
        else:
            hnew[ub, j] = tanh(v)
    if new_seq.shape[0] > 0:
        ns = new_seq[ts]
        for j in range(U(H)):
            ns[ub, j] = hnew[ub, j]


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
def _fwd_phase(ph, c, nth, m, t, ts, cell, H, Wf, Wn, Wr, src, A, An, rh, hnew, S, O, X, b_hh, hcur, c_state,
               cn, ln_w, ln_b, lnc_w, lnc_b, peep, zh, zc, h_seq, c_seq, hu_seq, hn_seq, hw_hat, hw_rstd,
               c_hat, c_rstd, new_seq, proj):
    """Thread c of nth's share of forward phase ph (0 A = src W^T | 1 rows: LN + cell |
    2 An = rh W_hn^T | 3 rows: GRU n | 4 h_new = hu W_hr^T | 5 rows: zoneout)."""
    if ph == 0 or ph == 2 or ph == 4:
        W = Wf if ph == 0 else (Wn if ph == 2 else Wr)
        a = src if ph == 0 else (rh if ph == 2 else hu_seq[ts])
        out = A if ph == 0 else (An if ph == 2 else hnew)
        P = W.shape[0]
        gemm_chunk(c * P // nth, (c + 1) * P // nth, m, W, a, S, out, h_seq[t][:0], False)
        return
    G = A.shape[1]
    Hr = hcur.shape[1]
    split = An.shape[1] > 0
    for b in range(c * m // nth, (c + 1) * m // nth):
        if ph == 1:
            _hw_row(b, ts, 2 * H if split else G, A, b_hh, ln_w, ln_b, hw_hat, hw_rstd)
            if cell == LSTM:
                _lstm_var_fwd_row(b, t, ts, H, X, A, c_state, peep, zc, cn, lnc_w, lnc_b, c_hat, c_rstd,
                                  c_seq, new_seq, hu_seq[ts] if proj else hnew, O)
            elif cell == GRU:
                if split:
                    _gru_rz_fwd_row(b, H, X, A, src, rh, O)
                    continue
                _gru_var_fwd_row(b, ts, H, X, A, hcur, hn_seq, hnew, O)
            else:
                _rnn_var_fwd_row(b, ts, cell == RNN_RELU, H, X, A, hnew, new_seq)
            if not proj:
                _h_finish_row(b, t, Hr, hnew, hcur, zh, h_seq)
        elif ph == 3:
            _gru_n_fwd_row(b, ts, H, X, An, b_hh, hcur, hn_seq, hnew)
            _h_finish_row(b, t, Hr, hnew, hcur, zh, h_seq)
        else:
            _h_finish_row(b, t, Hr, hnew, hcur, zh, h_seq)


@jit(**_JIT_PARALLEL)
def _run_phase_fwd(ph, nth, m, t, ts, cell, H, Wf, Wn, Wr, src, A, An, rh, hnew, S, O, X, b_hh, hcur, c_state,
                   cn, ln_w, ln_b, lnc_w, lnc_b, peep, zh, zc, h_seq, c_seq, hu_seq, hn_seq, hw_hat, hw_rstd,
                   c_hat, c_rstd, new_seq, proj):
    """One forward phase on nth threads (on the calling thread when nth == 1)."""
    if nth == 1:
        _fwd_phase(ph, 0, 1, m, t, ts, cell, H, Wf, Wn, Wr, src, A, An, rh, hnew, S[0], O[0], X, b_hh, hcur, c_state,
                   cn, ln_w, ln_b, lnc_w, lnc_b, peep, zh, zc, h_seq, c_seq, hu_seq, hn_seq, hw_hat, hw_rstd,
                   c_hat, c_rstd, new_seq, proj)
    else:
        for c in prange(nth):
            _fwd_phase(ph, c, nth, m, t, ts, cell, H, Wf, Wn, Wr, src, A, An, rh, hnew, S[c], O[c], X, b_hh, hcur,
                       c_state, cn, ln_w, ln_b, lnc_w, lnc_b, peep, zh, zc, h_seq, c_seq, hu_seq, hn_seq,
                       hw_hat, hw_rstd, c_hat, c_rstd, new_seq, proj)


@jit(**_JIT)
def rnn_forward_var(nth_max, min_macs, cell, reset_after, xw, w_hh, w_n, b_hh, h0, c0, w_hr, batch_sizes,
                    reverse, training, ln_w, ln_b, lnc_w, lnc_b, peep, rec_mask, zh, zc, reset,
                    h_seq, h_state, c_state, c_seq, hu_seq, hn_seq, hw_hat, hw_rstd, c_hat, c_rstd, new_seq):
    """Forward recurrence of a variant over all T steps (equations: docs/variants.md).

    As ``rnn_forward`` for the plain arguments (xw [T, B, G] is overwritten with the activated
    gates; c_seq, hu_seq, hn_seq and the variant's saved tensors have T step slots when
    training, one scratch slot otherwise, none (empty) when unused), plus:
    reset_after  GRU: False = n from (r * h_in) W_hn^T;  w_n [H, Hr] = W_hh[2H:3H] then (else empty)
    ln_w, ln_b [G]; lnc_w, lnc_b [H]; peep [3, H]; rec_mask [B, Hr]; zh [T, B, Hr]; zc [T, B, H];
    reset [T, B] bool: each empty when the option is off
    hw_hat [T|1, B, G], hw_rstd [T|1, B] (layer norm); c_hat [T|1, B, H], c_rstd [T|1, B] (cell
    layer norm); new_seq [T|1, B, H]: c_new (LSTM) / h_new (RNN) before zoneout, when zoneout is on.
    """
    T, B, G = xw.shape
    Hr = w_hh.shape[1]
    proj = w_hr.shape[0] > 0
    H = G // 4 if cell == LSTM else (G // 3 if cell == GRU else G)
    split = cell == GRU and not reset_after
    dt = xw.dtype
    Wf = _packed_plain(w_hh, 2 * H if split else G, Hr, False, nth_max)
    Wn = _packed_plain(w_n, H, Hr, False, nth_max) if split else Wf[:0]
    Wr = _packed_plain(w_hr, Hr, H, False, nth_max) if proj else Wf[:0]
    S = np.empty((nth_max, MR4, 4 * UNIT_GROUP), dt)
    Osc = np.empty((nth_max, 4 * UNIT_GROUP), dt)        # per thread: gate outputs of a unit group
    A = np.empty((B, G), dt)
    An = np.empty((B, H if split else 0), dt)
    rh = np.empty((B, H if split else 0), dt)
    hnew = np.empty((B, Hr), dt)
    hcur = np.empty((B, Hr), dt)
    hin = np.empty((B, Hr if rec_mask.shape[0] > 0 else 0), dt)
    cn = np.empty((B, H if cell == LSTM else 0), dt)
    _copy_rows(h0, hcur, 0, B)
    if cell == LSTM:
        _copy_rows(c0, c_state, 0, B)
    has_reset, has_mask = reset.shape[0] > 0, rec_mask.shape[0] > 0
    for s in range(T):
        t = T - 1 - s if reverse else s
        m = batch_sizes[t]
        ts = t if training else 0
        # the state entering the step: reset rows restart from (h0, c0); h_in = h_prev * rec_mask
        if has_reset:
            for b in range(m):
                if reset[t, b]:
                    _copy_rows(h0[b:b + 1], hcur[b:b + 1], 0, 1)
                    if cell == LSTM:
                        _copy_rows(c0[b:b + 1], c_state[b:b + 1], 0, 1)
        if has_mask:
            for b in range(m):
                for k in range(Hr):
                    hin[b, k] = hcur[b, k] * rec_mask[b, k]
        src = hin if has_mask else hcur
        nth = _threads(m * G * Hr, Wf.shape[0], nth_max, min_macs)
        for ph in range(6):
            if (ph == 2 or ph == 3) and not split:
                continue
            if (ph == 4 or ph == 5) and not proj:
                continue
            # phase 5 (zoneout after the projection) is a few flops per unit: no fork/join for it
            nth_ph = 1 if ph == 5 else nth
            _run_phase_fwd(ph, nth_ph, m, t, ts, cell, H, Wf, Wn, Wr, src, A, An, rh, hnew, S, Osc, xw[t], b_hh, hcur,
                           c_state, cn, ln_w, ln_b, lnc_w, lnc_b, peep, zh, zc, h_seq, c_seq, hu_seq, hn_seq,
                           hw_hat, hw_rstd, c_hat, c_rstd, new_seq, proj)
        if m < B:  # finished rows keep their state; their outputs and saved entries are zero
            _zero_rows(h_seq[t], m)
            if training:
                _zero_rows(xw[t], m)
                for arr in (c_seq, hu_seq, hn_seq, hw_hat, c_hat, new_seq):
                    if arr.shape[0] > 0:
                        _zero_rows(arr[ts], m)
                for vec in (hw_rstd, c_rstd):
                    if vec.shape[0] > 0:
                        for b in range(m, B):
                            vec[ts, b] = 0
    _copy_rows(hcur, h_state, 0, B)


@jit(**_JIT)
def _bwd_pre_row(b, t, Hr, dh, gs, zh, dnew, ddir, ghp, proj):
    """Gradient reaching h_t (dh[b] from step t+1, gs[t, b] from the output) split by zoneout:
    dnew[b] <- (1 - zh) of it (to h_new), ddir[b] <- zh of it (straight to h_prev); with a
    projection dnew is also recorded in ghp[t, b] (for grad_w_hr)."""
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
def _lstm_var_bwd_row(b, t, c, H, A, D, CN, CP, bp, peep, zc, lnc_w, lnc_b, c_hat, c_rstd, dc, dv, dy, gx,
                      g_lnc_w, g_lnc_b, g_peep, O):
    """LSTM backward of row b at step t. A[b]: saved i, f, g, o; D[b]: gradient reaching
    hu = o tanh(y); CN[b]: c_new; CP[bp]: c_prev; dc[b]: gradient reaching c_t in, c_prev out;
    dv [B, H] scratch (gradient reaching c_new from hu), dy [B, >= H] scratch (the gradient of y
    with the cell layer norm: not in place, which would keep the norm's loop from vectorising);
    gx[b] <- d_i, d_f, d_g, d_o; g_*[c]: this thread's parameter gradients."""
    one = A.dtype.type(1)
    ub, uH = U(b), U(H)
    has_peep, has_zc, has_lnc = peep.shape[0] > 0, zc.shape[0] > 0, lnc_w.shape[0] > 0
    ch = c_hat[t] if has_lnc else CN
    dyv = dy if has_lnc else dv
    for j in range(uH):
        o = A[ub, uH + uH + uH + j]
        tc = tanh(ch[ub, j] * lnc_w[j] + lnc_b[j]) if has_lnc else tanh(CN[ub, j])
        d = D[ub, j]
        gx[ub, uH + uH + uH + j] = d * tc * o * (one - o)
        dyv[ub, j] = d * o * (one - tc * tc)
    if has_lnc:   # gradient of y = LN(c_new) -> of c_new
        _ln_bwd_row(b, t, c, H, dy, dv, lnc_w, c_hat, c_rstd, g_lnc_w, g_lnc_b)
    gp = g_peep[c] if has_peep else peep
    for J0 in range(0, H, UNIT_GROUP):
        J, nu = U(J0), U(min(UNIT_GROUP, H - J0))
        _lstm_var_bwd_units(ub, t, uH, J, nu, A, CN, CP, bp, peep, zc, dc, dv, gx, gp, O, has_peep, has_zc)
        _scatter_gates(O, U(0), U(3), gx, ub, uH, J, nu)


@jit(**_JIT_INLINE)
def _lstm_var_bwd_units(ub, t, uH, J, nu, A, CN, CP, bp, peep, zc, dc, dv, gx, gp, O, has_peep, has_zc):
    """Units J .. J+nu-1 of _lstm_var_bwd_row after the output gate: d_i, d_f, d_g to O (UG apart)."""
    one = A.dtype.type(1)
    for u in range(nu):
        j = J + u
        i, f, g = A[ub, j], A[ub, uH + j], A[ub, uH + uH + j]
        d_o = gx[ub, uH + uH + uH + j]
        cp = CP[bp, j]
        dct = dc[ub, j]
        dcn = dv[ub, j] + ((one - zc[t, ub, j]) * dct if has_zc else dct)
        if has_peep:
            dcn += d_o * peep[2, j]
        d_i = dcn * g * i * (one - i)
        d_f = dcn * cp * f * (one - f)
        d_g = dcn * i * (one - g * g)
        dcp = dcn * f
        if has_zc:
            dcp += zc[t, ub, j] * dct
        if has_peep:
            dcp += d_i * peep[0, j] + d_f * peep[1, j]
            gp[0, j] += d_i * cp
            gp[1, j] += d_f * cp
            gp[2, j] += d_o * CN[ub, j]
        dc[ub, j] = dcp
        O[u], O[UG + u], O[UG2 + u] = d_i, d_f, d_g


@jit(**_JIT)
def _gru_var_bwd_row(b, H, A, HN, HP, bp, D, ddir, gx, gh, O):
    """GRU (reset_after=True) backward of row b. A[b]: saved r, z, n; HN[b]: hw_n; HP[bp]:
    h_prev; D[b]: gradient reaching h_new; ddir[b] += its part through z h_prev;
    gx[b] <- d_r, d_z, d_n;  gh[b] <- d_r, d_z, d_n r (gradient of hw). O: scratch row."""
    one = A.dtype.type(1)
    ub, uH = U(b), U(H)
    for J0 in range(0, H, UNIT_GROUP):
        J, nu = U(J0), U(min(UNIT_GROUP, H - J0))
        for u in range(nu):
            j = J + u
            r, z, n = A[ub, j], A[ub, uH + j], A[ub, uH + uH + j]
            d = D[ub, j]
            d_n = d * (one - z) * (one - n * n)
            O[u] = d_n * HN[ub, j] * r * (one - r)
            O[UG + u] = d * (HP[bp, j] - n) * z * (one - z)
            O[UG2 + u] = d_n
            O[UG3 + u] = d_n * r
            ddir[ub, j] += d * z
        _scatter_gates(O, U(0), U(3), gx, ub, uH, J, nu)
        _scatter_gates(O, U(0), U(2), gh, ub, uH, J, nu)
        _scatter_gates(O, UG3, U(1), gh, ub, uH, J + U(2) * uH, nu)


@jit(**_JIT)
def _gru_zn_bwd_row(b, H, A, HP, bp, D, ddir, gx, dpn, O):
    """GRU reset_after=False, first half of row b's backward: d_z, d_n into gx[b] and d_n
    into dpn[b] (for d(r h_in) = d_n W_hn); ddir[b] += d z. O: scratch row."""
    one = A.dtype.type(1)
    ub, uH = U(b), U(H)
    for J0 in range(0, H, UNIT_GROUP):
        J, nu = U(J0), U(min(UNIT_GROUP, H - J0))
        for u in range(nu):
            j = J + u
            z, n = A[ub, uH + j], A[ub, uH + uH + j]
            d = D[ub, j]
            d_n = d * (one - z) * (one - n * n)
            O[u] = d * (HP[bp, j] - n) * z * (one - z)
            O[UG + u] = d_n
            dpn[ub, j] = d_n
            ddir[ub, j] += d * z
        _scatter_gates(O, U(0), U(2), gx, ub, uH, J + uH, nu)


@jit(**_JIT)
def _gru_r_bwd_row(b, H, A, HP, bp, mask, drh, gx, dhin):
    """GRU reset_after=False, second half: drh[b] = d(r h_in); d_r into gx[b]; dhin[b] <- drh r
    (the part of h_in's gradient through r * h_in; the W_h{r,z} product is added after)."""
    one = A.dtype.type(1)
    ub = U(b)
    has_mask = mask.shape[0] > 0
    for j in range(U(H)):
        r = A[ub, j]
        h_in = HP[bp, j] * mask[ub, j] if has_mask else HP[bp, j]
        gx[ub, j] = drh[ub, j] * h_in * r * (one - r)
        dhin[ub, j] = drh[ub, j] * r


@jit(**_JIT)
def _rnn_var_bwd_row(b, relu, H, HN, D, gx):
    """RNN backward of row b: HN[b] = h_new; gx[b] <- D[b] act'(h_new) (relu: a select, so that a
    NaN gradient stays out of switched-off units, as torch)."""
    one, zero = HN.dtype.type(1), HN.dtype.type(0)
    ub = U(b)
    for j in range(U(H)):
        h = HN[ub, j]
        if relu:
            gx[ub, j] = D[ub, j] if h > zero else zero
        else:
            gx[ub, j] = D[ub, j] * (one - h * h)


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


@jit(**_JIT)
def _bwd_phase(ph, c, nth, m, t, tp, m_prev, cell, H, Wb, Wnb, Wu, S, O, gs, h0, c0, ln_w, lnc_w, lnc_b, peep,
               mask, zh, zc, reset, h_seq, acts, c_seq, hn_seq, hw_hat, hw_rstd, c_hat, c_rstd, new_seq, dh, dc,
               gx, gh, ghp, dnew, ddir, dhu, dhin, dv, dtmp, dpn, drh, gh0, gc0, g_ln_w, g_ln_b, g_lnc_w,
               g_lnc_b, g_peep, proj):
    """Thread c of nth's share of backward phase ph (0 rows: dh_new [projection] | 1 dhu =
    dh_new W_hr | 2 rows: cell and layer-norm backward | 3 d(r h_in) = d_n W_hn | 4 rows: GRU d_r
    | 5 dh_in = grad_hw W_hh | 6 rows: rec_mask, zoneout, reset). gx, gh: grad_xw[t], grad_hw[t]."""
    split = dpn.shape[1] > 0
    if ph == 1 or ph == 3 or ph == 5:
        W = Wu if ph == 1 else (Wnb if ph == 3 else Wb)
        a = dnew if ph == 1 else (dpn if ph == 3 else gh)
        out = dhu if ph == 1 else (drh if ph == 3 else dhin)
        P = W.shape[0]
        gemm_chunk(c * P // nth, (c + 1) * P // nth, m, W, a, S, out, dh[:0], ph == 5 and split)
        return
    G = gx.shape[1]
    Hr = dh.shape[1]
    has_ln = ln_w.shape[0] > 0
    for b in range(c * m // nth, (c + 1) * m // nth):
        if ph == 0 or (ph == 2 and not proj):
            _bwd_pre_row(b, t, Hr, dh, gs, zh, dnew, ddir, ghp, proj)
        if ph == 2:
            a_t = acts[t]
            if cell == LSTM:
                cn = new_seq[t] if new_seq.shape[0] > 0 else c_seq[t]
                _lstm_var_bwd_row(b, t, c, H, a_t, dhu if proj else dnew, cn,
                                  _prev_state(b, t, tp, m_prev, c_seq, c0, reset), U(b), peep, zc, lnc_w, lnc_b,
                                  c_hat, c_rstd, dc, dv, dtmp, gx, g_lnc_w, g_lnc_b, g_peep, O)
            elif cell == GRU:
                hp = _prev_state(b, t, tp, m_prev, h_seq, h0, reset)
                if split:
                    _gru_zn_bwd_row(b, H, a_t, hp, U(b), dnew, ddir, gx, dpn, O)
                else:
                    # with layer norm, d hw goes to scratch first (the norm's backward then writes gh)
                    _gru_var_bwd_row(b, H, a_t, hn_seq[t], hp, U(b), dnew, ddir, gx, dtmp if has_ln else gh, O)
            else:
                hn = new_seq[t] if new_seq.shape[0] > 0 else h_seq[t]
                _rnn_var_bwd_row(b, cell == RNN_RELU, H, hn, dnew, gx)
            if has_ln:   # through the hidden-side layer norm: grad_hw = d a
                _ln_bwd_row(b, t, c, G, dtmp if cell == GRU else gx, gh, ln_w, hw_hat, hw_rstd, g_ln_w, g_ln_b)
        elif ph == 4:
            _gru_r_bwd_row(b, H, acts[t], _prev_state(b, t, tp, m_prev, h_seq, h0, reset), U(b), mask, drh, gx,
                           dhin)
        elif ph == 6:
            _bwd_finish_row(b, t, dhin, mask, ddir, reset, dh, dc, gh0, gc0)


@jit(**_JIT_PARALLEL)
def _run_phase_bwd(ph, nth, m, t, tp, m_prev, cell, H, Wb, Wnb, Wu, S, O, gs, h0, c0, ln_w, lnc_w, lnc_b, peep,
                   mask, zh, zc, reset, h_seq, acts, c_seq, hn_seq, hw_hat, hw_rstd, c_hat, c_rstd, new_seq, dh,
                   dc, gx, gh, ghp, dnew, ddir, dhu, dhin, dv, dtmp, dpn, drh, gh0, gc0, g_ln_w, g_ln_b, g_lnc_w,
                   g_lnc_b, g_peep, proj):
    """One backward phase on nth threads (on the calling thread when nth == 1)."""
    if nth == 1:
        _bwd_phase(ph, 0, 1, m, t, tp, m_prev, cell, H, Wb, Wnb, Wu, S[0], O[0], gs, h0, c0, ln_w, lnc_w, lnc_b, peep,
                   mask, zh, zc, reset, h_seq, acts, c_seq, hn_seq, hw_hat, hw_rstd, c_hat, c_rstd, new_seq, dh,
                   dc, gx, gh, ghp, dnew, ddir, dhu, dhin, dv, dtmp, dpn, drh, gh0, gc0, g_ln_w, g_ln_b, g_lnc_w,
                   g_lnc_b, g_peep, proj)
    else:
        for c in prange(nth):
            _bwd_phase(ph, c, nth, m, t, tp, m_prev, cell, H, Wb, Wnb, Wu, S[c], O[c], gs, h0, c0, ln_w, lnc_w, lnc_b,
                       peep, mask, zh, zc, reset, h_seq, acts, c_seq, hn_seq, hw_hat, hw_rstd, c_hat, c_rstd,
                       new_seq, dh, dc, gx, gh, ghp, dnew, ddir, dhu, dhin, dv, dtmp, dpn, drh, gh0, gc0, g_ln_w,
                       g_ln_b, g_lnc_w, g_lnc_b, g_peep, proj)


@jit(**_JIT)
def rnn_backward_var(nth_max, min_macs, cell, reset_after, grad_h_seq, w_hh, w_n, w_hr, h0, c0, batch_sizes,
                     reverse, ln_w, lnc_w, lnc_b, peep, rec_mask, zh, zc, reset, h_seq, acts, c_seq, hn_seq,
                     hw_hat, hw_rstd, c_hat, c_rstd, new_seq, dh, dc, grad_xw, grad_hw, grad_hproj,
                     g_ln_w, g_ln_b, g_lnc_w, g_lnc_b, g_peep):
    """Backward recurrence of a variant (the forward's steps in the opposite order).

    Arguments as ``rnn_backward`` and ``rnn_forward_var`` (the saved tensors with T slots), plus
    grad_hw [T, B, G] out when it differs from grad_xw (layer norm, GRU reset_after=True), else
    empty (then grad_xw is also grad_hw); g_ln_w, g_ln_b [nth_max, G], g_lnc_w, g_lnc_b
    [nth_max, H], g_peep [nth_max, 3, H]: zeroed per-thread accumulators of the parameter
    gradients (summed by the caller), empty when the option is off.
    dh [B, Hr], dc [B, H]: grad_h_T, grad_c_T in; grad_h0, grad_c0 out (including reset steps).
    """
    T, B, G = grad_xw.shape
    Hr = w_hh.shape[1]
    proj = w_hr.shape[0] > 0
    H = G // 4 if cell == LSTM else (G // 3 if cell == GRU else G)
    split = cell == GRU and not reset_after
    sep = grad_hw.shape[0] > 0
    dt = grad_xw.dtype
    Wb = _packed_plain(w_hh, Hr, 2 * H if split else G, True, nth_max)       # dh_in = grad_hw W_hh
    Wnb = _packed_plain(w_n, Hr, H, True, nth_max) if split else Wb[:0]      # d(r h_in) = d_n W_hn
    Wu = _packed_plain(w_hr, H, Hr, True, nth_max) if proj else Wb[:0]       # dhu = dh_new W_hr
    S = np.empty((nth_max, MR4, 4 * UNIT_GROUP), dt)
    Osc = np.empty((nth_max, 4 * UNIT_GROUP), dt)        # per thread: gate gradients of a unit group
    dnew = np.empty((B, Hr), dt)
    ddir = np.empty((B, Hr), dt)
    dhin = np.empty((B, Hr), dt)
    dhu = np.empty((B, H if proj else 0), dt)
    dv = np.empty((B, H if cell == LSTM else 0), dt)
    dtmp = np.empty((B, G if ln_w.shape[0] > 0 else 0), dt)   # layer-norm backward input (not in place)
    dpn = np.empty((B, H if split else 0), dt)
    drh = np.empty((B, H if split else 0), dt)
    gh0 = np.zeros((B, Hr), dt)
    gc0 = np.zeros((B, dc.shape[1]), dt)
    for s in range(T):
        t = s if reverse else T - 1 - s
        m = batch_sizes[t]
        tp = t + 1 if reverse else t - 1
        m_prev = (batch_sizes[tp] if tp < T else 0) if reverse else (m if t > 0 else 0)
        gx = grad_xw[t]
        gh = grad_hw[t] if sep else gx
        nth = _threads(m * G * Hr, Wb.shape[0], nth_max, min_macs)
        for ph in range(7):
            if (ph == 0 or ph == 1) and not proj:
                continue
            if (ph == 3 or ph == 4) and not split:
                continue
            # the last row phase is a few adds per unit: cheaper on this thread than a fork/join
            nth_ph = 1 if ph == 6 else nth
            _run_phase_bwd(ph, nth_ph, m, t, tp, m_prev, cell, H, Wb, Wnb, Wu, S, Osc, grad_h_seq, h0, c0, ln_w, lnc_w,
                           lnc_b, peep, rec_mask, zh, zc, reset, h_seq, acts, c_seq, hn_seq, hw_hat, hw_rstd,
                           c_hat, c_rstd, new_seq, dh, dc, gx, gh, grad_hproj, dnew, ddir, dhu, dhin, dv, dtmp, dpn,
                           drh, gh0, gc0, g_ln_w, g_ln_b, g_lnc_w, g_lnc_b, g_peep, proj)
        if m < B:
            _zero_rows(gx, m)
            if sep:
                _zero_rows(gh, m)
            if proj:
                _zero_rows(grad_hproj[t], m)
    for b in range(B):
        for k in range(Hr):
            dh[b, k] += gh0[b, k]
        for j in range(gc0.shape[1]):
            dc[b, j] += gc0[b, j]
