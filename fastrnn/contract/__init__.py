"""The contract between the op layer (``fastrnn/ops``) and the backends (``fastrnn/backends``):
the bottom of the package. It imports only torch; the op layer and every backend import it, and
no backend imports the op layer.

    contract/rnn.py      the recurrence's data: cells and gate counts, ``Variant`` (plain = None),
                         ``VariantGrads``, the saved layout by name, previous/recurrent states
    contract/sdpa.py     the attention's data: ``SdpaMask``
    contract/checks.py   the validation boundary: every registered op and every backend contract
                         function checks its arguments here before anything runs
    contract/backend.py  what a backend module must and may define (``RecurrenceBackend``,
                         ``AttentionBackend``)

Operations and equations are specified by the reference backends (``reference_rnn.py``,
``reference_sdpa.py``); backends are tested against them.
"""
