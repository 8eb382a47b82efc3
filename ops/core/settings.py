"""Base class of every stage's settings model.

Each stage declares its own small pydantic model next to it (``EmbedConfig`` in ``embed.py``, ...); the job
layer composes them into the run config. Unknown keys are errors, so a typo fails with the key's dotted path.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
