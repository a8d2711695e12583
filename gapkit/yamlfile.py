"""Load a YAML file into a pydantic model, with errors that name the file, key and line.

Specs and inventories are written by hand; a mistake should read like
`gapkit.yaml:7: platforms[1]: 'linux' is not a platform`, not like a pydantic dump.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from gapkit.errors import UsageError

M = TypeVar("M", bound=BaseModel)

#: Spec files are small; anything larger is not one.
MAX_SPEC_SIZE = 1024 * 1024


def load_model(path: Path, model: type[M]) -> M:
    """Parse `path` as YAML and validate it as `model`; raise UsageError naming key and line."""
    try:
        if path.stat().st_size > MAX_SPEC_SIZE:
            raise UsageError(f"{path} is larger than {MAX_SPEC_SIZE} bytes; it is not a spec file")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise UsageError(f"{where}: not valid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: the top level must be a mapping of keys to values")
    try:
        return model.model_validate(data, context={"base": path.parent})
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            line = _line_of(node, loc)
            where = f"{path}:{line}" if line else str(path)
            lines.append(f"{where}: {_dotted(loc) or '(top level)'}: {_message(error)}")
        raise UsageError(
            "\n".join(lines) if len(lines) == 1 else f"{path} has {len(lines)} problems:\n"
            + "\n".join(f"  {line}" for line in lines),
            hint="see README.md for the keys this file takes",
        ) from None


def _message(error: Any) -> str:
    message = str(error.get("msg", "invalid"))
    if error.get("type") == "extra_forbidden":
        return "unknown key"
    return message.removeprefix("Value error, ")


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest node on `loc` that exists in the document."""
    best = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if found is None:
                key = next((k for k, _ in node.value if getattr(k, "value", None) == part), None)
                return key.start_mark.line + 1 if key is not None else best
            node = found
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                and part < len(node.value):
            node = node.value[part]
        else:
            return best
        best = node.start_mark.line + 1
    return best
