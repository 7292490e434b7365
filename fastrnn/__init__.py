"""fastrnn: fused LSTM / GRU / RNN recurrences (and attention) for PyTorch, drop-in for torch.nn.

>>> import fastrnn
>>> lstm = fastrnn.LSTM(256, 512, num_layers=2, batch_first=True)   # nn.LSTM's arguments
>>> model = fastrnn.convert(model)                                   # swap torch's RNN modules
>>> fastrnn.available_backends("cpu")                                # e.g. ['cpp', 'numba', 'torch']
"""
import sys

__version__ = "0.1.0"

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "to_torch",
           "available_backends", "backend_status", "functional", "set_num_threads", "get_num_threads",
           "Attention", "scaled_dot_product_attention", "AttentionDecoder", "__version__"]


def _load():
    """The public API, and with it the ``torch.ops.fastrnn`` ops (registered on import)."""
    global available_backends, backend_status, GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, convert, to_torch
    global functional, get_num_threads, set_num_threads, Attention, scaled_dot_product_attention, AttentionDecoder
    from . import functional
    from .attention import Attention, scaled_dot_product_attention
    from .backends import available_backends, backend_status
    from .decoder import AttentionDecoder
    from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, convert, to_torch
    from .threads import get_num_threads, set_num_threads


def _running_cli() -> bool:
    """``python -m fastrnn ...``: runpy imports this package (sys.argv[0] is "-m" meanwhile) to
    run fastrnn/__main__.py, whose commands import what they need; so ``--help`` and a mistyped
    option answer without importing torch (seconds on a loaded machine)."""
    argv = getattr(sys, "orig_argv", [])
    return sys.argv[:1] == ["-m"] and "-m" in argv and argv[argv.index("-m") + 1:][:1] == [__name__]


if _running_cli():
    _loading = False

    def __getattr__(name):
        global _loading
        # re-entered while loading (``from . import functional`` inside modules.py asks the package
        # first): not an attribute yet, so the import system imports the submodule itself
        if name in __all__ and not _loading:
            _loading = True
            try:
                _load()
            finally:
                _loading = False
            return globals()[name]
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
else:
    _load()
