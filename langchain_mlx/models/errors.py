"""The errors of model preparation: below every other module of `models/`.

`ModelLoadError` (a folder that cannot be loaded) lives in `engine/types.py`,
where the engine raises it too.
"""

from __future__ import annotations

__all__ = ["ModelPreparationError"]


class ModelPreparationError(RuntimeError):
    """A model could not be prepared, for a reason the user can act on."""
