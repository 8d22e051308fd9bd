"""YAML loading that remembers where each value came from, so every error says `file:line: message`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from schoolslink.errors import ConfigurationError


class LDict(dict[str, Any]):
    """A mapping with the line of itself (`line`) and of each key (`lines`)."""

    line: int = 0
    lines: dict[str, int]


class LList(list[Any]):
    line: int = 0


class MappingFileError(ConfigurationError):
    def __init__(self, path: Path | str, line: int, message: str) -> None:
        super().__init__(f"{path}:{line}: {message}")
        self.path = str(path)
        self.line = line
        self.message = message


class _Loader(yaml.SafeLoader):
    pass


def _map(loader: _Loader, node: yaml.MappingNode) -> LDict:
    out = LDict()
    out.line = node.start_mark.line + 1
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(None, None, "keys must be text", key_node.start_mark)
        if key in out:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


def _seq(loader: _Loader, node: yaml.SequenceNode) -> LList:
    out = LList(loader.construct_object(n, deep=True) for n in node.value)
    out.line = node.start_mark.line + 1
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _seq)
# Dates stay text: a mapping's dates are data, and `2026-09-01` must not silently become a date object.
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MappingFileError(path, 0, f"cannot read: {exc.strerror}") from None
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        raise MappingFileError(path, line, f"not valid YAML: {exc.problem or exc.context}") from None


def line_of(node: Any, key: str | None = None, default: int = 0) -> int:
    if isinstance(node, LDict):
        if key is not None and key in node.lines:
            return node.lines[key]
        return node.line
    if isinstance(node, LList):
        return node.line
    return default
