"""Small calls (streaming decoders, RL policies): a cell or a T=1 layer at batch 2, fastrnn cpp
against torch, interleaved in one process, plus the cpp contract call and its check alone.

    python bench/small_calls.py THREADS

Prints medians (and minima) of 9 rounds x 300 calls, in microseconds.
"""
import statistics
import sys
import time

import torch

import fastrnn
from fastrnn import backends
from fastrnn.contract import checks

B, I, H = 2, 64, 64


def bench(fn, n=300, rounds=9):
    for _ in range(50):
        fn()
    out = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(out), min(out)


def main(threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tc, fc = torch.nn.LSTMCell(I, H), fastrnn.LSTMCell(I, H, backend="cpp")
    fc.load_state_dict(tc.state_dict())
    tg, fg = torch.nn.GRU(I, H), fastrnn.GRU(I, H, backend="cpp")
    fg.load_state_dict(tg.state_dict())
    x, h, c = torch.randn(B, I, requires_grad=True), torch.randn(B, H), torch.randn(B, H)
    xs, h0 = torch.randn(1, B, I), torch.randn(1, B, H)

    def cell_train(m):
        def f():
            hh, cc = m(x, (h, c))
            (hh.sum() + cc.sum()).backward()
        return f

    def no_grad(m, *args):
        def f():
            with torch.no_grad():
                m(*args)
        return f

    rows = [("LSTMCell fwd+bwd", cell_train(tc), cell_train(fc)),
            ("LSTMCell fwd no_grad", no_grad(tc, x, (h, c)), no_grad(fc, x, (h, c))),
            ("GRU T=1 no_grad", no_grad(tg, xs, h0), no_grad(fg, xs, h0))]
    for name, a, b in rows:
        ta, tb = bench(a), bench(b)
        print(f"{name:22s} threads={threads} torch {ta[0]:7.1f} us (min {ta[1]:.1f})  "
              f"fastrnn {tb[0]:7.1f} us (min {tb[1]:.1f})  ratio {ta[0] / tb[0]:.2f}x")
    impl = backends.load("cpp", "rnn")
    xw, w_hh, b_hh = torch.randn(1, B, 4 * H), tc.weight_hh.detach(), tc.bias_hh.detach()
    call = bench(lambda: impl.rnn_forward("lstm", xw.clone(), w_hh, b_hh, h, c, None, None, False, False))
    check = bench(lambda: checks.check_rnn_forward("lstm", xw, w_hh, b_hh, h, c, None, None, False, False))
    print(f"  cpp contract rnn_forward T=1 (with its check) {call[0]:.1f} us; check_rnn_forward {check[0]:.1f} us")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
