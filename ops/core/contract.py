"""What a stage needs from its input and what it adds, checked by the job layer at every stage boundary.

Modelled on NeMo Curator's ``ProcessingStage.inputs()/outputs()``: a stage module declares a
:class:`StageContract`; the job layer calls :meth:`StageContract.check_input` before the stage and
:meth:`StageContract.check_output` after it, so a wiring mistake fails with the stage and column named instead
of a ``KeyError`` deep inside a Ray worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable


class ContractError(ValueError):
    """A stage's input lacks a column it needs, or its output lacks a column it promised."""


@dataclass(frozen=True)
class StageContract:
    stage: str
    needs: tuple[str, ...]
    adds: tuple[str, ...]

    def check_input(self, columns: Iterable[str]) -> None:
        self._check(columns, self.needs, "its input lacks")

    def check_output(self, columns: Iterable[str]) -> None:
        self._check(columns, self.adds, "its output lacks")

    def _check(self, columns: Iterable[str], wanted: tuple[str, ...], what: str) -> None:
        have = set(columns)
        missing = [c for c in wanted if c not in have]
        if missing:
            raise ContractError(f"stage {self.stage}: {what} column {', '.join(repr(c) for c in missing)} "
                                f"(has {', '.join(sorted(have)) or 'no columns'})")
