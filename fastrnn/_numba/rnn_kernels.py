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
import os

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, types  # noqa: F401  (get_num_threads: for callers)
from numba.core import cgutils
from numba.core.extending import intrinsic, overload

# On-disk cache of compiled kernels (see the module docstring of fastrnn.backends.numba_rnn).
CACHE = os.environ.get("FASTRNN_NUMBA_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")

# fastmath "contract" only: fused multiply-add, nothing that assumes values are finite.
_JIT = dict(cache=CACHE, nogil=True, fastmath={"contract"}, error_model="numpy")
# Only explicit prange loops run in parallel: Numba would otherwise turn every slice
# assignment inside the time loop into a parallel region of its own.
_JIT_PARALLEL = dict(_JIT, parallel={"prange": True, "comprehension": False, "reduction": False,
                                     "inplace_binop": False, "setitem": False, "numpy": False,
                                     "stencil": False, "fusion": False})

# Small helpers called once per row: inlined into the caller's Numba IR, so that the array
# views passed to them cost no reference counting and no call.
_JIT_INLINE = dict(_JIT, inline="always")

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


@njit(**_JIT)
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


@njit(**_JIT)
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


@njit(**_JIT)
def _sigmoid_f32(x):
    return _ONE32 / (_ONE32 + _exp_f32(-x))


@njit(**_JIT)
def _tanh_f32(x):
    a = abs(x)
    e = _exp_f32(-_TWO32 * a)
    big = (_ONE32 - e) / (_ONE32 + e)
    if x < 0:
        big = -big
    x2 = x * x
    small = x + x * x2 * (_T3 + x2 * (_T5 + x2 * (_T7 + x2 * _T9)))
    return small if a < _TANH_SMALL else big


@njit(**_JIT)
def _sigmoid_f64(x):
    e = math.exp(-abs(x))            # never overflows
    return 1.0 / (1.0 + e) if x >= 0 else e / (1.0 + e)


def sigmoid(x):
    """Logistic function of a float32 or float64 scalar (compiled by the overload below)."""
    raise NotImplementedError("only callable from numba-compiled code")


def tanh(x):
    """Hyperbolic tangent of a float32 or float64 scalar (compiled by the overload below)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(sigmoid, jit_options=_JIT)
def _sigmoid_overload(x):
    if x == types.float32:
        return lambda x: _sigmoid_f32(x)
    return lambda x: _sigmoid_f64(x)


@overload(tanh, jit_options=_JIT)
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


@njit(**_JIT_INLINE)
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


@njit(**_JIT_INLINE)
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


@njit(**_JIT_INLINE)
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


@njit(**_JIT_INLINE)
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


@njit(**_JIT_INLINE)
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


@njit(**_JIT_INLINE)
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


@njit(**_JIT_INLINE)
def _scatter_gates(O, o0, ngates, X, b, H, J, nu):
    """X[b, v*H + J + u] = O[o0 + v*UG + u] for gates v < ngates: one simple loop per gate."""
    for v in range(ngates):
        src, dst = o0 + U(v) * UG, U(v) * H + J
        for u in range(nu):
            X[b, dst + u] = O[src + u]


@njit(**_JIT_INLINE)
def _copy_units(src, b, dst, J, nu):
    for u in range(nu):
        dst[b, J + u] = src[b, J + u]


# ---------------------------------------------------------------------------------------------
# One thread's share of a step: panels [p0, p1) of the packed weights
# ---------------------------------------------------------------------------------------------
@njit(**_JIT)
def _row_tiles(m, mr_max):
    """Number of row tiles and the base tile height for m rows in tiles of at most mr_max
    (heights differ by at most one: 32 rows -> 6, 6, 5, 5, 5, 5)."""
    n = (m + mr_max - 1) // mr_max
    return n, (m // n if n > 0 else 0), (m % n if n > 0 else 0)


@njit(**_JIT)
def _gemm_tile(a, r0, mr, W, p, S, s_off, ldv, nv):
    """S[r, s_off + v*ldv + l] = (a[r0 + r] @ panel p of W)[v*L + l]; nv is 3 or 4."""
    K = W.shape[1]
    if nv == 3:
        tile_gemm(a, r0 * a.shape[1], a.shape[1], 1, mr, W, p * K * W.shape[2], W.shape[2], S, s_off, S.shape[1], ldv,
                  K, 3, MR3)
    else:
        tile_gemm(a, r0 * a.shape[1], a.shape[1], 1, mr, W, p * K * W.shape[2], W.shape[2], S, s_off, S.shape[1], ldv,
                  K, 4, MR4)


@njit(**_JIT)
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


@njit(**_JIT_INLINE)
def _store_units(S, r, out, b, J, nu, accumulate):
    """out[b, J + u] (+)= S[r, u] for u < nu."""
    if accumulate:
        for u in range(nu):
            out[b, J + u] += S[r, u]
    else:
        for u in range(nu):
            out[b, J + u] = S[r, u]


@njit(**_JIT)
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


@njit(**_JIT)
def gemm_chunk(p0, p1, m, W, a, S, out_a, out_b, accumulate):
    """``_gemm_group`` over panels [p0, p1), a group of UNIT_GROUP units at a time."""
    ppg = UNIT_GROUP // W.shape[2]
    for g0 in range(p0, p1, ppg):
        _gemm_group(g0, min(g0 + ppg, p1), m, W, a, S, out_a, out_b, accumulate)


@njit(**_JIT)
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


@njit(**_JIT)
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


@njit(**_JIT)
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
@njit(**_JIT)
def _threads(macs, panels, nth_max, min_macs):
    """Threads for one step: one when the step is too small to repay a parallel region."""
    if macs < min_macs or nth_max < 2:
        return 1
    return min(nth_max, panels)


@njit(**_JIT)
def _copy_rows(src, dst, r0, r1):
    for b in range(r0, r1):
        for k in range(src.shape[1]):
            dst[b, k] = src[b, k]


@njit(**_JIT)
def _zero_rows(a, r0):
    for b in range(r0, a.shape[0]):
        for k in range(a.shape[1]):
            a[b, k] = 0


@njit(**_JIT_PARALLEL)
def _packed_forward_weights(cell, w_hh, H, dtype_probe):
    L = VEC_BYTES // dtype_probe.itemsize
    gate_layout = cell == LSTM or cell == GRU
    nv = 3 if cell == GRU else 4
    upp = L if gate_layout else nv * L
    W = np.empty(((H + upp - 1) // upp, w_hh.shape[1], nv * L), w_hh.dtype)
    for p in prange(W.shape[0]):
        pack_panel(w_hh, False, nv if gate_layout else 1, H, nv, W, p)
    return W


@njit(**_JIT_PARALLEL)
def _packed_plain(M, units, K, trans):
    """Pack for ``y = x @ M'`` with ``units`` output columns, K inputs (see pack_panel)."""
    L = VEC_BYTES // M.itemsize
    W = np.empty(((units + 4 * L - 1) // (4 * L), K, 4 * L), M.dtype)
    for p in prange(W.shape[0]):
        pack_panel(M, trans, 1, units, 4, W, p)
    return W


@njit(**_JIT_PARALLEL)
def rnn_forward(nth_max, min_macs, cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training,
                h_seq, h_state, c_state, c_seq, hu_seq, hn_seq):
    """Forward recurrence over all T steps.

    nth_max     threads to use at most (``numba.get_num_threads()``: passed in because calling
                it from compiled code would make the kernel uncacheable)
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
    Wf = _packed_forward_weights(cell, w_hh, H, xw)
    P = Wf.shape[0]
    Wr = _packed_plain(w_hr, Hr, H, False) if proj else Wf[:0]
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


@njit(**_JIT_PARALLEL)
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
    Wb = _packed_plain(w_hh, Hr, G, True)            # dh = grad_gates @ W_hh
    Pb = Wb.shape[0]
    Wu = _packed_plain(w_hr, H, Hr, True) if proj else Wb[:0]   # dhu = dh @ W_hr
    Pu = Wu.shape[0]
    upp = Wb.shape[2]
    zeros = np.zeros((1, H), grad_xw.dtype)
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


@njit(**_JIT_INLINE)
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


@njit(**_JIT_PARALLEL)
def gemm(nth, a, a_rs, a_ks, M, B_mat, trans_b, bias, out):
    """out [M, N] = A @ B' (+ bias): A[r, k] = a[r*a_rs + k*a_ks] (``a`` flat, so A may be a
    transposed view); B' = B_mat^T for B_mat [N, K], or B_mat [K, N] itself if ``trans_b``;
    bias [N] or empty; nth: threads. B' is packed into plain panels (in parallel) unless it
    is B_mat [K, N] with N a multiple of the panel width (then its rows already are panel
    rows); then row blocks of A run in parallel, GEMM_K_CHUNK deep at a time, each as
    register tiles against every panel."""
    N = out.shape[1]
    K = B_mat.shape[0] if trans_b else B_mat.shape[1]
    L = VEC_BYTES // out.itemsize
    P = (N + 4 * L - 1) // (4 * L)
    direct = trans_b and N % (4 * L) == 0
    W = np.empty((0 if direct else P, K, 4 * L), out.dtype)
    if not direct:
        for p in prange(P):
            pack_panel(B_mat, trans_b, 1, N, 4, W, p)
    Wflat = B_mat.reshape(-1) if direct else W.reshape(-1)
    ldw = N if direct else 4 * L
    has_bias = bias.shape[0] > 0
    # at least one block per thread, blocks of at most GEMM_ROW_BLOCK rows, balanced
    nblk = max((M + GEMM_ROW_BLOCK - 1) // GEMM_ROW_BLOCK, min(nth, (M + MR4 - 1) // MR4))
    for blk in prange(nblk):
        S = np.empty((MR4, 4 * L), out.dtype)
        r_lo, r_hi = blk * M // nblk, (blk + 1) * M // nblk
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
    if K == 0:
        for r in range(M):
            for n in range(N):
                out[r, n] = bias[n] if has_bias else 0
