"""Typed stage configs: dataclass defaults < YAML preset < command-line overrides.

Every stage declares one dataclass whose fields carry a docstring right under them
(torchtitan style). `parse_config` turns that class into an argparse parser whose help
text is those docstrings, loads `--preset` (a name under the stage's preset directory
or a YAML path), applies the overrides and returns a validated instance; `config_to_dict`
gives the resolved values that go into the stage's manifest and MLflow run.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

C = TypeVar("C")


class ConfigError(ValueError):
    """A config value is missing, unknown or invalid."""


class StageConfig:
    """Base of every stage config and of every option section mixed into one: one validation entry point.

    The dataclass's `__post_init__` calls `validate()` once. A section or a stage overrides `validate`,
    checks its own fields and calls `super().validate()`, so one call walks the whole MRO (sections are
    defined once and mixed in, torchtitan-style, while the command line keeps its flat flags).
    `check_required()` refuses a run that lacks an option it needs; it is separate because
    `--print-config` must work on a config that is not complete yet.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field's value; raise ConfigError naming the option."""

    def missing_options(self) -> list[str]:
        """Flags (`--out`, `--model or --init-images`) a run needs that are not given; [] by default."""
        return []

    def check_required(self) -> None:
        """Refuse a run without the options it needs, all named in one error."""
        missing = self.missing_options()
        if missing:
            raise ConfigError(f"missing required option(s): {', '.join(missing)}")

    def check_at_least(self, minimum: float, *names: str) -> None:
        """Each named field is >= minimum (None counts as unset and passes)."""
        for name in names:
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise ConfigError(f"{name} must be >= {minimum}, got {value}")

    def check_positive(self, *names: str) -> None:
        """Each named field is > 0."""
        for name in names:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

    def check_fraction(self, *names: str) -> None:
        """Each named field is in [0, 1]."""
        for name in names:
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)}")


@functools.cache
def field_docs(cls: type) -> Mapping[str, str]:
    """Attribute docstrings (the string literal right under each field) of a dataclass.

    Cached: a class's source is parsed once per process. CPython 3.11 keeps the AST
    builder's recursion depth in shared state, so an `ast.parse` racing one in another
    thread (Ray's, MLflow's) can fail with a spurious SystemError (cpython gh-106905);
    the parse is retried then, as its input is unchanged.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        body = _class_body(klass)
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return types.MappingProxyType(docs)  # read-only: every caller shares the cached value


def _class_body(klass: type, attempts: int = 3) -> list[ast.stmt]:
    """The statements of a class definition; empty when its source is not available."""
    for attempt in range(attempts):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
            break
        except (OSError, TypeError):
            return []
        except SystemError:  # the cross-thread AST race above: the same source parses on a retry
            if attempt == attempts - 1:
                raise
    return tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []


def comma_list(value: str | Sequence[str]) -> list[str]:
    """A comma list given as one string or as a sequence of strings (each may hold commas), stripped."""
    parts = [value] if isinstance(value, str) else list(value)
    return [item.strip() for part in parts for item in part.split(",") if item.strip()]


def _factory_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _is_list(tp: Any) -> bool:
    return typing.get_origin(_strip_optional(tp)[0]) in (list, tuple)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional or value is None:
            return None
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            return _to_bool(value)
        if tp in (int, float, str):
            return tp(value)
        if origin is typing.Literal:
            if value not in typing.get_args(tp):
                raise ConfigError(f"{name}: {value!r} is not one of {list(typing.get_args(tp))}")
            return value
        if origin in (list, tuple):
            (item_tp, *_) = typing.get_args(tp) or (str,)
            items = value.split(",") if isinstance(value, str) else list(value)
            items = [coerce(v.strip() if isinstance(v, str) else v, item_tp, name) for v in items if v != ""]
            return items if origin is list else tuple(items)
        if origin is dict or tp is dict:
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a mapping, got {value!r}")
            return dict(value)
        if dataclasses.is_dataclass(tp):
            return from_dict(tp, value) if isinstance(value, dict) else value
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{name}: cannot read {value!r} as {getattr(tp, '__name__', tp)}") from exc
    return value


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"not a boolean: {value!r}")


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build `cls` from a mapping, refusing keys the dataclass does not declare."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(names)}")
    return cls(**{k: coerce(v, hints[k], k) for k, v in data.items()})


def config_to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain JSON/YAML-able values (for manifests and MLflow)."""
    return dataclasses.asdict(config)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one `--flag` per field; help text from the field docstrings.

    `--help` lists the flags by section: the stage's own fields first, then one group per option
    section it mixes in (the class that declares the field); the flags themselves stay flat.
    """
    parser = argparse.ArgumentParser(
        description=description or (cls.__doc__ or "").strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", default=None, help="YAML preset: a name under the stage's presets or a path")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    docs = field_docs(cls)
    hints = _hints(cls)
    for section, fields in option_sections(cls).items():
        group = parser.add_argument_group(section.__name__, None if section is cls else _summary(section))
        for f in fields:
            _add_flag(group, f, hints[f.name], docs.get(f.name, ""))
    return parser


def option_sections(cls: type) -> dict[type, list[dataclasses.Field]]:
    """The dataclass's fields by the class that declares each one (its section), the stage's own first.

    A field a stage re-declares only to change its default stays in the section that declares it.
    """
    owners = {f.name: _declaring_class(cls, f.name) for f in dataclasses.fields(cls)}
    return {klass: [f for f in dataclasses.fields(cls) if owners[f.name] is klass]
            for klass in cls.__mro__ if klass in owners.values()}


def _declaring_class(cls: type, name: str) -> type:
    return next((klass for klass in reversed(cls.__mro__) if name in inspect.get_annotations(klass)), cls)


def _summary(klass: type) -> str:
    """A section's docstring up to its first blank line."""
    return " ".join((inspect.getdoc(klass) or "").split("\n\n")[0].split())


def _add_flag(group: argparse._ArgumentGroup, f: dataclasses.Field, hint: Any, help_text: str) -> None:
    tp, _ = _strip_optional(hint)
    default = f.default if f.default is not dataclasses.MISSING else _factory_default(f)
    if tp is bool:
        group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=f"{help_text} (default: {default})")
    elif _is_list(hint):  # repeatable: --condition a=1 --condition b=2 is --condition a=1,b=2
        group.add_argument(_flag(f.name), dest=f.name, action="append", default=argparse.SUPPRESS,
                           metavar=f.name.upper(), help=f"{help_text} (repeatable; default: {default!r})")
    else:
        group.add_argument(_flag(f.name), dest=f.name, default=argparse.SUPPRESS,
                           metavar=f.name.upper(), help=f"{help_text} (default: {default!r})")


def resolve_preset(preset: str, preset_dir: str | Path | None) -> Path:
    """A preset is a YAML path, or a bare name looked up in `preset_dir`."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    if preset_dir is not None:
        candidate = Path(preset_dir) / f"{preset}.yaml"
        if candidate.exists():
            return candidate
        known = sorted(p.stem for p in Path(preset_dir).glob("*.yaml"))
        raise ConfigError(f"unknown preset {preset!r}; presets in {preset_dir}: {known}")
    raise ConfigError(f"preset file not found: {preset}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a YAML mapping of option: value")
    return data


def parse_config(
    cls: type[C],
    argv: Sequence[str] | None = None,
    preset_dir: str | Path | None = None,
    description: str | None = None,
) -> C:
    """Defaults < preset < command-line flags, validated by the dataclass's __post_init__.

    `--print-config` prints the resolved YAML and exits 0, so users can check what a
    `ray job submit` line will run with before spending cluster time.
    """
    parser = build_parser(cls, description)
    args = vars(parser.parse_args(argv))
    preset, print_only = args.pop("preset"), args.pop("print_config")
    values: dict[str, Any] = load_yaml(resolve_preset(preset, preset_dir)) if preset else {}
    values.update({k: ",".join(v) if isinstance(v, list) else v for k, v in args.items()})  # repeated flags
    try:
        config = from_dict(cls, values)
    except ValueError as exc:  # ConfigError, or a __post_init__ check

        parser.error(str(exc))
    if print_only:
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False))
        raise SystemExit(0)
    return config
