r"""Reference backend ``"torch"`` for scaled-dot-product attention: plain PyTorch, the specification.

It runs the flash algorithm with torch ops on blocks of ``BLOCK_L`` queries against ``BLOCK_S``
keys, so it is also the readable model of what the cpp, numba and triton kernels do. It is tested
in float64 against ``torch.nn.functional.scaled_dot_product_attention``; every other backend is
tested against it (and against torch).

Attention contract (what every ``*_sdpa`` backend module implements)
--------------------------------------------------------------------
The op layer (``fastrnn/ops/attention.py``) validates inputs and flattens torch's broadcasting
into these simple shapes; backends never see leading dims, bool masks or dtypes they do not list
in ``dtypes``. Shape letters: ``N`` flattened batch x heads of the query, ``Nk`` of key/value,
``L`` queries, ``S`` keys, ``E`` query/key width, ``Ev`` value width. ``N, L, S, E, Ev >= 1``
(the op layer answers empty problems itself).

``sdpa_forward(q, k, v, mask, scale, causal, dropout_p, seed) -> (out, lse)``
    q     [N, L, E]    contiguous
    k     [Nk, S, E]   contiguous; ``N % Nk == 0``. Grouped-query attention: query row ``n``
                       uses key/value row ``n // (N // Nk)`` (the op layer flattens ``[..., H, L, E]``
                       so that the ``G = N // Nk`` query heads sharing a key head are adjacent)
    v     [Nk, S, Ev]  contiguous
    mask  ``None`` or ``(bias, rows)``: ``bias`` [Nm, L, S] additive float mask in q's dtype
          (``-inf`` = masked out), possibly a broadcast view: its stride along S is 0 or 1, along
          L and Nm anything (0 included). ``rows`` [N] int64: query row ``n`` uses ``bias[rows[n]]``.
          (Bool masks arrive converted: True -> 0, False -> -inf.)
    scale      float multiplying ``q @ k^T``
    causal     top-left aligned: query ``i`` sees keys ``j <= i`` (also when L != S)
    dropout_p  float in [0, 1); 0 means no dropout (p >= 1 never reaches a backend)
    seed       int in [0, 2**32): with ``keep(n, i, j)`` below, the dropout mask is a pure function
               of (seed, n, i, j), so backward regenerates it and nothing L x S is stored
  returns ``out`` [N, L, Ev] and ``lse`` [N, L] (log-sum-exp of each query row's masked, scaled
  scores, before dropout; ``+inf`` for a row with no visible key). Both in q's dtype (triton
  keeps ``lse`` in float32 for float16 / bfloat16 inputs; only its own backward reads it).

``sdpa_backward(grad_out, q, k, v, out, lse, mask, scale, causal, dropout_p, seed)
        -> (grad_q [N, L, E], grad_k [Nk, S, E], grad_v [Nk, S, Ev])``
    ``grad_out`` [N, L, Ev] contiguous, the rest as returned by / given to ``sdpa_forward``.
    ``grad_k`` / ``grad_v`` sum over the ``G`` query heads that share a key head.

Each module also has ``name``, ``availability(device_type) -> str | None`` and ``dtypes`` (the
tensor dtypes it computes in; the op layer computes others in float32 and casts back).

Equations (one query row ``i`` of batch row ``n``; ``kv = n // G``)
-------------------------------------------------------------------
::
    s_ij  = scale * q_i . k_j + bias[rows[n], i, j]     (-inf where causal and j > i)
    lse_i = log sum_j exp(s_ij)
    p_ij  = exp(s_ij - lse_i)                            softmax, saved only as lse_i
    z_ij  = keep(n, i, j) / (1 - dropout_p)              (1 without dropout)
    out_i = sum_j p_ij z_ij v_j

A row whose scores are all ``-inf`` has ``lse_i = +inf``, ``out_i = 0`` and zero gradients, as
torch 2.13 returns on CPU (its math and flash paths agree). NaN propagates; a ``+inf`` score
gives NaN as in torch.

Forward, online softmax over key blocks ``J`` (running max ``m``, running sum ``l``, ``acc``)::
    m' = max(m, max_{j in J} s_ij);  mu = m' if m' > -inf else 0   (all -inf so far: exp -> 0)
    alpha = exp(m - mu);  p_ij = exp(s_ij - mu)
    l = alpha l + sum_J p_ij;  acc = alpha acc + sum_J p_ij z_ij v_j;  m = m'
    out_i = acc / l (0 if l == 0);  lse_i = m + log l (+inf if l == 0)

Backward, recomputing ``p_ij = exp(s_ij - lse_i)`` block by block::
    D_i   = grad_out_i . out_i                           (= sum_j p_ij z_ij grad_out_i . v_j)
    dv_j += sum_i p_ij z_ij grad_out_i
    ds_ij = p_ij (z_ij grad_out_i . v_j - D_i)
    dq_i += scale sum_j ds_ij k_j;   dk_j += scale sum_i ds_ij q_i

Dropout mask (identical bits in every backend; 32-bit unsigned arithmetic, ``*`` wraps mod 2**32)::
    mix(x)      = x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0x735A2D97; x ^= x >> 15
    row(n, i)   = mix(mix(seed ^ (n * 0x61C88647)) ^ (i * 0x165667B1))
    keep(n,i,j) = mix(row(n, i) ^ (j * 0x27D4EB2F)) >= floor(dropout_p * 2**32)
``mix`` is C. Wellons' ``lowbias32``-style finaliser (a bijection with full avalanche). All
constants are below 2**31, so the same formulas hold in int64 arithmetic masked to 32 bits
(how this file and the numba kernels compute them).
"""
from __future__ import annotations

import torch

name = "torch"
dtypes = (torch.float32, torch.float64)

BLOCK_L = 32  # queries per block
BLOCK_S = 32  # keys per block

M32 = 0xFFFFFFFF
MIX_1, MIX_2 = 0x21F0AAAD, 0x735A2D97
MUL_N, MUL_I, MUL_J = 0x61C88647, 0x165667B1, 0x27D4EB2F


def availability(device_type: str) -> str | None:
    return None  # plain torch runs wherever torch does


# -- dropout mask ---------------------------------------------------------------------------------

def mix32(x: torch.Tensor) -> torch.Tensor:
    """The 32-bit finaliser on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * MIX_1) & M32
    x = x ^ (x >> 15)
    x = (x * MIX_2) & M32
    return x ^ (x >> 15)


def dropout_threshold(dropout_p: float) -> int:
    """Keep an entry when its 32-bit hash is >= this (keep probability 1 - p up to 2**-32)."""
    return int(dropout_p * 4294967296.0)


def dropout_keep(seed: int, n: torch.Tensor, i: torch.Tensor, j: torch.Tensor, dropout_p: float):
    """Boolean keep mask for broadcastable int64 index tensors ``n``, ``i``, ``j``."""
    row = mix32(mix32((n * MUL_N & M32) ^ seed) ^ (i * MUL_I & M32))
    return mix32(row ^ (j * MUL_J & M32)) >= dropout_threshold(dropout_p)


# -- shared block math ----------------------------------------------------------------------------

def _scores(q_blk, k_blk, mask, scale, causal, i0, j0):
    """s [Nk, G, BL, BS] for queries i0.. of every row against keys j0.. (rows grouped by kv)."""
    s = torch.matmul(q_blk, k_blk.transpose(-1, -2)) * scale
    BL, BS = s.shape[-2:]
    if mask is not None:
        bias, rows = mask
        s = s + bias[:, i0:i0 + BL, j0:j0 + BS][rows].reshape(s.shape)
    if causal:
        i = torch.arange(i0, i0 + BL, device=s.device).view(-1, 1)
        j = torch.arange(j0, j0 + BS, device=s.device).view(1, -1)
        s = s.masked_fill(j > i, float("-inf"))
    return s


def _dropout_scale(s, seed, dropout_p, n_idx, i0, j0):
    """z [Nk, G, BL, BS]: keep / (1 - p)."""
    BL, BS = s.shape[-2:]
    i = torch.arange(i0, i0 + BL, dtype=torch.int64, device=s.device).view(-1, 1)
    j = torch.arange(j0, j0 + BS, dtype=torch.int64, device=s.device).view(1, -1)
    keep = dropout_keep(seed, n_idx, i, j, dropout_p)
    return keep.to(s.dtype) / (1.0 - dropout_p)


def _grouped(t, Nk):
    """[N, X, Y] -> [Nk, G, X, Y]: the G query rows that share key/value row ``kv``."""
    return t.view(Nk, t.shape[0] // Nk if Nk else 0, *t.shape[1:])


def _key_blocks(S, BS, causal, i0, BL):
    """Key block starts that a query block [i0, i0 + BL) can see (causal skips the rest)."""
    stop = min(S, i0 + BL) if causal else S
    return range(0, stop, BS)


def sdpa_forward(q, k, v, mask, scale, causal, dropout_p, seed):
    N, L, E = q.shape
    Nk, S, Ev = v.shape
    dtype = q.dtype
    qg = _grouped(q, Nk)  # [Nk, G, L, E]
    kg, vg = k.unsqueeze(1), v.unsqueeze(1)  # [Nk, 1, S, *]
    n_idx = _grouped(torch.arange(N, device=q.device).view(N, 1, 1), Nk)  # [Nk, G, 1, 1] int64
    # Written out of place (blocks collected, then concatenated) and with the running max
    # detached, so that torch.autograd differentiates it, twice, with exact derivatives: the
    # op code's double backward recomputes this forward under autograd. The max only keeps exp()
    # in range: out and lse do not depend on its value, so its gradient would be zero anyway.
    out_blocks, lse_blocks = [], []
    for i0 in range(0, L, BLOCK_L):
        i1 = min(L, i0 + BLOCK_L)
        q_blk = qg[:, :, i0:i1]
        m = torch.full(q_blk.shape[:-1] + (1,), float("-inf"), dtype=dtype, device=q.device)
        l = torch.zeros_like(m)
        acc = q.new_zeros(q_blk.shape[:-1] + (Ev,))
        for j0 in _key_blocks(S, BLOCK_S, causal, i0, i1 - i0):
            j1 = min(S, j0 + BLOCK_S)
            s = _scores(q_blk, kg[:, :, j0:j1], mask, scale, causal, i0, j0)
            m_new = torch.maximum(m, s.detach().amax(-1, keepdim=True))
            # rows that have seen only -inf so far: subtract 0, so every exp is exactly 0
            mu = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
            alpha = torch.exp(m - mu)
            p = torch.exp(s - mu)
            l = alpha * l + p.sum(-1, keepdim=True)
            if dropout_p > 0:
                p = p * _dropout_scale(s, seed, dropout_p, n_idx, i0, j0)
            acc = alpha * acc + torch.matmul(p, vg[:, :, j0:j1])
            m = m_new
        empty = l == 0  # no visible key: torch returns zeros
        # divide and log by 1 there, not 0: where() would pass the 0 * inf gradient (NaN) on
        l_safe = torch.where(empty, torch.ones_like(l), l)
        out_blocks.append(torch.where(empty, torch.zeros_like(acc), acc / l_safe))
        lse_blocks.append(torch.where(empty, float("inf"), m + torch.log(l_safe)).squeeze(-1))
    if not out_blocks:  # L = 0
        return q.new_zeros(N, L, Ev), q.new_zeros(N, L)
    return torch.cat(out_blocks, 2).reshape(N, L, Ev), torch.cat(lse_blocks, 2).reshape(N, L)


def sdpa_backward(grad_out, q, k, v, out, lse, mask, scale, causal, dropout_p, seed):
    N, L, E = q.shape
    Nk, S, Ev = v.shape
    qg, dog = _grouped(q, Nk), _grouped(grad_out, Nk)
    kg, vg = k.unsqueeze(1), v.unsqueeze(1)
    lseg = _grouped(lse, Nk).unsqueeze(-1)  # [Nk, G, L, 1]
    delta = (dog * _grouped(out, Nk)).sum(-1, keepdim=True)  # D_i [Nk, G, L, 1]
    n_idx = _grouped(torch.arange(N, device=q.device).view(N, 1, 1), Nk)  # [Nk, G, 1, 1] int64
    grad_q = torch.zeros_like(q)
    grad_k = torch.zeros_like(k)
    grad_v = torch.zeros_like(v)
    dqg = _grouped(grad_q, Nk)
    for i0 in range(0, L, BLOCK_L):
        i1 = min(L, i0 + BLOCK_L)
        q_blk, do_blk = qg[:, :, i0:i1], dog[:, :, i0:i1]
        for j0 in _key_blocks(S, BLOCK_S, causal, i0, i1 - i0):
            j1 = min(S, j0 + BLOCK_S)
            k_blk, v_blk = kg[:, :, j0:j1], vg[:, :, j0:j1]
            s = _scores(q_blk, k_blk, mask, scale, causal, i0, j0)
            p = torch.exp(s - lseg[:, :, i0:i1])  # lse = +inf (row fully masked) -> p = 0
            dp = torch.matmul(do_blk, v_blk.transpose(-1, -2))
            pz = p
            if dropout_p > 0:
                z = _dropout_scale(s, seed, dropout_p, n_idx, i0, j0)
                pz, dp = p * z, dp * z
            grad_v[:, j0:j1] += torch.matmul(pz.transpose(-1, -2), do_blk).sum(1)
            ds = p * (dp - delta[:, :, i0:i1])
            dqg[:, :, i0:i1] += torch.matmul(ds, k_blk) * scale
            grad_k[:, j0:j1] += torch.matmul(ds.transpose(-1, -2), q_blk).sum(1) * scale
    return grad_q, grad_k, grad_v


def sdpa_grad_bias(grad_out, q, k, v, out, lse, mask, scale, causal, dropout_p, seed):
    """Gradient of the additive mask, ``grad_bias`` [Nm, L, S] = sum over the rows n that use
    mask row m of ``ds_n``. Not part of the backend contract: the op layer calls it (for every
    backend) only when a float mask requires grad; it is O(L*S) by nature."""
    bias, rows = mask
    N, L, E = q.shape
    Nk, S, Ev = v.shape
    qg, dog = _grouped(q, Nk), _grouped(grad_out, Nk)
    kg, vg = k.unsqueeze(1), v.unsqueeze(1)
    lseg = _grouped(lse, Nk).unsqueeze(-1)
    delta = (dog * _grouped(out, Nk)).sum(-1, keepdim=True)
    n_idx = _grouped(torch.arange(N, device=q.device).view(N, 1, 1), Nk)  # [Nk, G, 1, 1] int64
    grad_bias = q.new_zeros(bias.shape)
    for i0 in range(0, L, BLOCK_L):
        i1 = min(L, i0 + BLOCK_L)
        s = _scores(qg[:, :, i0:i1], kg, mask, scale, causal, i0, 0)
        p = torch.exp(s - lseg[:, :, i0:i1])
        dp = torch.matmul(dog[:, :, i0:i1], vg.transpose(-1, -2))
        if dropout_p > 0:
            dp = dp * _dropout_scale(s, seed, dropout_p, n_idx, i0, 0)
        ds = p * (dp - delta[:, :, i0:i1])
        grad_bias[:, i0:i1].index_add_(0, rows, ds.reshape(N, i1 - i0, S))
    return grad_bias
