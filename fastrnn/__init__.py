"""fastrnn: fused LSTM / GRU / RNN recurrences (and attention) for PyTorch, drop-in for torch.nn.

>>> import fastrnn
>>> lstm = fastrnn.LSTM(256, 512, num_layers=2, batch_first=True)   # nn.LSTM's arguments
>>> model = fastrnn.convert(model)                                   # swap torch's RNN modules
>>> fastrnn.available_backends("cpu")                                # e.g. ['cpp', 'numba', 'torch']
"""
from .backends import available_backends, backend_status
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, convert, to_torch
from . import functional
from .threads import get_num_threads, set_num_threads
from .attention import Attention, scaled_dot_product_attention

__version__ = "0.1.0"

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert", "to_torch",
           "available_backends", "backend_status", "functional", "set_num_threads", "get_num_threads",
           "Attention", "scaled_dot_product_attention", "__version__"]
