"""Old names kept for one release: each warns once (a ``DeprecationWarning`` naming its replacement).

The API has one name per concept, the reference API's (``round_to_pp_multiple``, ``scale_grads``,
``module_fqns_per_model_part``, ``visualize_current_schedule``); the ``pp_*`` training arguments keep theirs.
"""

from __future__ import annotations

import warnings
from typing import Any

from .errors import PipelineConfigError

__all__ = ["REMOVED_IN", "warn_deprecated", "renamed_argument"]

REMOVED_IN = "0.3"
_warned: set[str] = set()


def warn_deprecated(old: str, new: str) -> None:
    """Warn, the first time ``old`` is used in this process, that it is deprecated in favour of ``new``.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     warn_deprecated("AutoPipeline(doc_example_old=...)", "AutoPipeline(doc_example_new=...)")
        ...     warn_deprecated("AutoPipeline(doc_example_old=...)", "AutoPipeline(doc_example_new=...)")
        >>> [str(w.message) for w in caught]
        ['AutoPipeline(doc_example_old=...) is deprecated and will be removed in hf_pp 0.3; use AutoPipeline(doc_example_new=...).']
    """
    if old in _warned:
        return
    _warned.add(old)
    warnings.warn(f"{old} is deprecated and will be removed in hf_pp {REMOVED_IN}; use {new}.", DeprecationWarning,
                  stacklevel=3)


def renamed_argument(where: str, old: str, old_value: Any, new: str, new_value: Any, default: Any = None) -> Any:
    """The value of argument ``new``, given under its old name ``old`` (warned once) or its own.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     renamed_argument("f", "old_name", "up", "new_name", None)
        'up'
        >>> renamed_argument("f", "old_name", None, "new_name", "down")
        'down'
    """
    if old_value is None:
        return new_value
    if new_value != default:
        raise PipelineConfigError(f"{where}: pass {new} only; {old} is its deprecated name, not a second setting.")
    warn_deprecated(f"{where}({old}=...)", f"{where}({new}=...)")
    return old_value
