"""Attention for the Titans blocks: who sees whom (``rules``), one ``attend`` over three backends
(``dispatch``: SDPA, ``flex``, ``flash`` merged by log-sum-exp in ``merge``). See docs/attention.md.
"""

from .dispatch import BACKENDS, attend, attention_backend_report, select_backend
from .rules import Causal, DocCausal, KeyGroup, Visible, document_positions

__all__ = [
    "BACKENDS",
    "Causal",
    "DocCausal",
    "KeyGroup",
    "Visible",
    "attend",
    "attention_backend_report",
    "document_positions",
    "select_backend",
]
