"""The attention contract's data (operations: ``fastrnn/backends/reference_sdpa.py``).

Shape letters: N batch*heads of the queries, L queries, S keys, E query/key width, Ev value width,
Nm mask rows.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class SdpaMask(NamedTuple):
    """Additive mask in contract form: ``bias`` [Nm, L, S] (broadcast view allowed, stride along
    S 0 or 1), ``rows`` [N] int64: query row ``n`` uses ``bias[rows[n]]``."""
    bias: torch.Tensor
    rows: torch.Tensor
