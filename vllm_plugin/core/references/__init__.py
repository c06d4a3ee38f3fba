"""References DTD compares a token with: one module each, registered in :mod:`.base`.

* :mod:`.previous`  — step t − 1 at the same place (the paper's rule);
* :mod:`.last_kept` — the last token kept at the same place (ablation);
* :mod:`.motion`    — step t − 1 moved by the estimated camera translation.
"""

from vllm_plugin.core.references import last_kept, motion, previous  # noqa: F401  (registers them)
from vllm_plugin.core.references.base import (
    Comparison,
    Reference,
    get_reference,
    reference_names,
    register_reference,
    unregister_reference,
)

__all__ = ["Comparison", "Reference", "get_reference", "reference_names", "register_reference", "unregister_reference"]
