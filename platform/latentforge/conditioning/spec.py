"""What the conditions are: the columns precompute keeps, and the vocabulary / range the manifest records.

Each sample's conditions become one row of floats, one entry per condition in manifest order:
a class condition holds its label's id (the index in the sorted label list), a scalar its value.
The null condition (what guidance's unconditional branch and condition dropout use) is the
reserved id `len(labels)` for a class, NaN for a scalar.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from latentforge.config import ConfigError

if TYPE_CHECKING:
    import torch

KINDS = ("class", "scalar")


@dataclass(frozen=True)
class ConditionColumn:
    """One `--condition COLUMN:KIND` of precompute."""

    name: str
    kind: str


def parse_condition_columns(items: Iterable[str]) -> list[ConditionColumn]:
    """["label:class", "score:scalar"] -> columns; a malformed or repeated item is a ConfigError."""
    columns: list[ConditionColumn] = []
    for item in items:
        name, _, kind = str(item).strip().rpartition(":")
        if not name or kind not in KINDS:
            raise ConfigError(f"condition {item!r}: expected COLUMN:class or COLUMN:scalar")
        if any(c.name == name for c in columns):
            raise ConfigError(f"condition column {name!r} given twice")
        columns.append(ConditionColumn(name, kind))
    return columns


@dataclass
class ConditionSpec:
    """One condition as the manifest records it."""

    name: str
    kind: str
    labels: list[str] = field(default_factory=list)
    """class: the sorted labels seen; label i has id i, id len(labels) is the null id."""
    minimum: float | None = None
    """scalar: the smallest value seen."""
    maximum: float | None = None
    """scalar: the largest value seen."""

    @property
    def null_id(self) -> int:
        return len(self.labels)

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        if self.kind == "class":
            out.update(null_id=self.null_id, minimum=None, maximum=None)
        else:
            out.pop("labels")
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ConditionSpec":
        return cls(name=str(record["name"]), kind=str(record["kind"]), labels=list(record.get("labels") or []),
                   minimum=record.get("minimum"), maximum=record.get("maximum"))

    def value_of(self, raw: Any) -> float:
        """A sample's raw value -> its row entry (label id or scalar); ValueError when not in the record."""
        if self.kind == "class":
            label = str(raw)
            if label not in self.labels:
                raise ValueError(f"condition {self.name}: label {label!r} is not in the vocabulary")
            return float(self.labels.index(label))
        value = float(raw)
        if not math.isfinite(value) or not self.minimum <= value <= self.maximum:  # type: ignore[operator]
            raise ValueError(f"condition {self.name}: {value:g} is outside the recorded range "
                             f"[{self.minimum:g}, {self.maximum:g}]")
        return value

    def null_value(self) -> float:
        return float(self.null_id) if self.kind == "class" else math.nan


@dataclass
class ConditionSet:
    """The conditions of a dataset / model, in manifest order."""

    specs: list[ConditionSpec] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.specs)

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]] | None) -> "ConditionSet":
        return cls([ConditionSpec.from_record(r) for r in records or []])

    @classmethod
    def from_manifest(cls, manifest: Any) -> "ConditionSet":
        """From a precompute manifest's `extra.conditions` (none recorded: no conditions)."""
        return cls.from_records(manifest.extra.get("conditions"))

    def records(self) -> list[dict[str, Any]]:
        return [s.record() for s in self.specs]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def null_row(self) -> list[float]:
        return [s.null_value() for s in self.specs]

    def row(self, values: dict[str, Any]) -> list[float]:
        """Raw values by name -> one row; a condition left out is null."""
        return [s.value_of(values[s.name]) if values.get(s.name) is not None else s.null_value()
                for s in self.specs]

    def rows(self, values: Sequence[dict[str, Any]]) -> "torch.Tensor":
        """(B, N) float32 rows of B samples' raw values."""
        import torch

        return torch.tensor([self.row(v) for v in values], dtype=torch.float32).reshape(len(values), len(self.specs))

    def parse_request(self, items: Iterable[str]) -> dict[str, Any]:
        """`--condition name=value` items -> {name: value}, checked against the record (ConfigError)."""
        request: dict[str, Any] = {}
        for item in items:
            name, sep, text = str(item).partition("=")
            spec = next((s for s in self.specs if s.name == name.strip()), None)
            if not sep or spec is None:
                known = self.names or "none (the model was trained without conditions)"
                raise ConfigError(f"condition {item!r}: expected NAME=VALUE with NAME one of {known}")
            value: Any = text.strip() if spec.kind == "class" else _float(spec.name, text)
            try:
                spec.value_of(value)
            except ValueError as exc:  # a scalar's message already names the range
                valid = f"; valid labels: {', '.join(spec.labels)}" if spec.kind == "class" else ""
                raise ConfigError(f"{exc}{valid}") from exc
            request[spec.name] = value
        return request


def _float(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"condition {name}: {text!r} is not a number") from None
