"""The errors every layer shares (data, engines, export, training, the node).

They live here, below every package, so that reading a dataset or a checkpoint does not import an
inference backend just to raise the right error, and so the dependency between `engine/` and
`export/` runs one way. Messages are user-facing: they say which file or input and why.
"""

from __future__ import annotations


class EngineError(RuntimeError):
    """A request the engine cannot serve (bad image, empty question, ...); message is user-facing."""


class ModelLoadError(EngineError):
    """A model directory that is missing, incomplete or corrupt; message says which file and why."""
