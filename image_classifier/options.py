"""Options declared once: a dataclass field's metadata makes its flag, its help text and its JSON form.

A stage's options dataclass (PreprocessOptions, TrainConfig) is the one place an option is written. From it
come the command-line parser (`add_options`), the help text with defaults drawn from the dataclass or the
model registry, the dict stored in a run's config.json, and `--config FILE` (`read_config_file`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

DECLARATION = "declaration"


@dataclass(frozen=True)
class Declaration:
    """How one option appears on the command line; attached to a dataclass field by `declared`."""

    help: str
    group: str = "training"
    type: Callable[[str], Any] | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    per_model: str | None = None
    """A ModelSpec attribute: when the option is left out (None) the model's own value is used."""
    default_text: str | None = None
    """How --help words the default when it is not a plain value."""
    action: str | None = None
    """'flag' (--augment) or 'negatable' (--batch-norm / --no-batch-norm)."""

    def flag(self, name: str) -> str:
        return "--" + name.replace("_", "-")


def declared(declaration: Declaration, default: Any = dataclasses.MISSING, **field_options) -> Any:
    """A dataclass field carrying its command-line declaration."""
    return dataclasses.field(default=default, metadata={DECLARATION: declaration}, **field_options)


def declarations(cls) -> list[tuple[dataclasses.Field, Declaration]]:
    return [
        (item, item.metadata[DECLARATION]) for item in dataclasses.fields(cls) if DECLARATION in item.metadata
    ]


def shown(value: Any) -> str:
    """An option's value as it would be typed: 512,256 for a tuple, '' for none, 0.001 for a float."""
    if isinstance(value, (list, tuple)):
        return ",".join(shown(item) for item in value) or "''"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def per_model_text(attribute: str) -> str:
    """'20 for backbones, 30 for mlp and cnn': a registry attribute's values, grouped as users think of them."""
    from .models import DEFAULT_MODEL, REGISTRY

    by_value: dict[str, list[str]] = {}
    backbones = [spec for spec in REGISTRY.values() if spec.pretrained]
    backbone_values = {shown(getattr(spec, attribute)) for spec in backbones}
    for spec in REGISTRY.values():
        if spec.pretrained:
            continue
        by_value.setdefault(shown(getattr(spec, attribute)), []).append(spec.name)
    others = {shown(getattr(spec, attribute)) for spec in backbones if spec.name != DEFAULT_MODEL}
    if len(backbone_values) == 1:
        by_value.setdefault(backbone_values.pop(), []).insert(0, "backbones")
    else:
        value = shown(getattr(REGISTRY[DEFAULT_MODEL], attribute))
        by_value.setdefault(value, []).append(DEFAULT_MODEL)
        if len(others) == 1:
            by_value.setdefault(others.pop(), []).append("the other backbones")
    if len(by_value) == 1:
        return next(iter(by_value))
    text = ", ".join(f"{value} for {' and '.join(names)}" for value, names in by_value.items())
    return text if len(backbone_values) <= 1 or not others else f"{text}; each other backbone has its own"


def help_text(item: dataclasses.Field, declaration: Declaration) -> str:
    default = item.default
    if declaration.default_text is not None:
        text = declaration.default_text
    elif declaration.per_model is not None:
        text = per_model_text(declaration.per_model)
    elif default is dataclasses.MISSING or default is None or default is False:
        return declaration.help
    else:
        text = shown(default)
    return f"{declaration.help} (default: {text})" if declaration.help else f"(default: {text})"


def add_options(parser: argparse.ArgumentParser, cls, skip: Iterable[str] = ()) -> None:
    """One flag per declared field of `cls`, in argument groups; only typed options land in the namespace."""
    groups: dict[str, Any] = {}
    for item, declaration in declarations(cls):
        if item.name in skip:
            continue
        if declaration.group not in groups:
            groups[declaration.group] = parser.add_argument_group(declaration.group)
        keywords: dict[str, Any] = {"dest": item.name, "default": argparse.SUPPRESS}
        keywords["help"] = help_text(item, declaration)
        if declaration.action == "flag":
            keywords["action"] = "store_true"
        elif declaration.action == "negatable":
            keywords["action"] = argparse.BooleanOptionalAction
        else:
            keywords.update(type=declaration.type, metavar=declaration.metavar)
            if declaration.choices:
                keywords["choices"] = declaration.choices
        groups[declaration.group].add_argument(declaration.flag(item.name), **keywords)


def coerce(cls, values: Mapping[str, Any]) -> dict[str, Any]:
    """JSON or argparse values -> field values: lists become tuples and paths Paths, unknown keys dropped."""
    result: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        if item.name not in values:
            continue
        value = values[item.name]
        kind = str(item.type)
        if value is not None and kind.startswith("tuple"):
            value = tuple(value)
        elif value is not None and kind.startswith("Path"):
            value = Path(value)
        result[item.name] = value
    return result


def as_json(options) -> dict[str, Any]:
    """A dataclass of options as stored in config.json (paths as text)."""
    return {
        key: str(value) if isinstance(value, Path) else value
        for key, value in dataclasses.asdict(options).items()
    }


def read_config_file(path: Path, cls) -> dict[str, Any]:
    """The options of a saved configuration: a run's config.json, a tuning best.json, or a flat JSON object."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(
            f"cannot read --config {path}: {error}; give a JSON file such as a run's config.json"
        ) from None
    options = content.get("options", content) if isinstance(content, dict) else None
    if not isinstance(options, dict):
        raise UserError(f"--config {path} holds no options object; give a run's config.json or a best.json")
    known = {item.name for item in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown and "options" not in content and not set(options) & known:
        raise UserError(
            f"--config {path} is not a run's config.json or a tuning best.json (none of its keys is an option, "
            f"such as {', '.join(unknown[:3])}); give one of those"
        )
    if unknown:
        raise UserError(
            f"--config {path} has options this version does not know: {', '.join(unknown)}; remove them"
        )
    return coerce(cls, options)
