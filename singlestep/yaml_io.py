"""The project's YAML: floats as YAML 1.2 reads them, duplicate keys refused, every problem with its
line and column; and a dumper whose output loads back to the same values."""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["YAMLProblems", "dump_yaml", "parse_yaml"]


def _shown(value: Any, limit: int = 80) -> str:
    """``repr`` of a value for a message, cut short: a pasted list should not flood the terminal."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Strings that a Python or JSON habit writes for null; in YAML they are strings.

class _Loader(yaml.SafeLoader):
    """Safe YAML, with three changes that make a mistake an error rather than a surprise.

    ``1e-3`` is a float (PyYAML follows YAML 1.1, where it is a string); a key given twice in one
    mapping is recorded in :attr:`duplicates` (PyYAML silently keeps the last); and a scalar that
    its tag cannot construct (``2020-13-45``, ``!!float abc``) is a YAML error at its line, not a
    Python ``ValueError``.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self.duplicates: list[tuple[yaml.Mark, str]] = []
        self._checked: set[int] = set()

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Checked here, before merge keys (`<<: *base`) pull in the keys that the mapping's own
        # may override, as YAML intends; once per node, as a merged node is flattened again.
        if id(node) not in self._checked:
            self._checked.add(id(node))
            first: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                try:
                    seen = first.setdefault(key, key_node.start_mark)
                except TypeError:
                    continue  # an unhashable key: construct_mapping reports it
                if seen is not key_node.start_mark:
                    here = key_node.start_mark
                    where = (f"on lines {seen.line + 1} and {here.line + 1}" if seen.line != here.line
                             else f"at columns {seen.column + 1} and {here.column + 1}")  # fmt: skip
                    problem = f"key {_shown(str(key))} given twice, {where} (a mapping takes each key once)"
                    self.duplicates.append((here, problem))
        super().flatten_mapping(node)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as exc:
            tag = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_shown(node.value)} as a {tag}: {exc}", node.start_mark
            ) from None


# YAML 1.2's floats (`1e-3`, not only `1.0e-3`). The dumper knows them too, so that it quotes the
# string '1e3' (a run name, say) which the loader would otherwise read back as a number.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


class _Dumper(yaml.SafeDumper):
    """Safe YAML out, quoting every string that :class:`_Loader` would read as something else."""


_Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


class YAMLProblems(yaml.MarkedYAMLError):
    """Problems found while loading YAML that PyYAML itself accepts (duplicate keys), each at its mark.

    ``problem`` and ``problem_mark`` are the first one's, as for any other YAML error.
    """

    def __init__(self, found: list[tuple[yaml.Mark, str]]):
        super().__init__(problem=found[0][1], problem_mark=found[0][0])
        self.found = found


def parse_yaml(text: str) -> Any:
    """Parse YAML text with the project's loader.

    Raises:
        yaml.MarkedYAMLError: invalid YAML, a character YAML does not allow, a value its tag cannot
            construct, nesting too deep to parse, or (:class:`YAMLProblems`) keys given twice in
            one mapping. Each has a ``problem`` and, where known, a ``problem_mark``.
    """
    loader = None
    try:
        loader = _Loader(text)  # checks every character here
        data = loader.get_single_data()
    except yaml.reader.ReaderError as exc:  # no `problem` or mark of its own
        line = text.count("\n", 0, exc.position)
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1)
        char = chr(exc.character) if isinstance(exc.character, int) else exc.character
        mark = yaml.Mark("<yaml>", exc.position, line, column, None, None)
        problem = f"character {char!r} is not allowed in YAML ({exc.reason})"
        raise yaml.MarkedYAMLError(problem=problem, problem_mark=mark) from None
    except RecursionError:
        raise yaml.MarkedYAMLError(problem="nested too deeply to parse") from None
    finally:
        if loader is not None:
            loader.dispose()
    if loader.duplicates:
        raise YAMLProblems(loader.duplicates)
    return data


def _yaml_problems(exc: yaml.YAMLError) -> list[tuple[int | None, int | None, str]]:
    """``(line, column, message)`` for each problem a YAML error carries, 1-based where known."""
    if isinstance(exc, YAMLProblems):
        return [(m.line + 1, m.column + 1, problem) for m, problem in exc.found]
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None and mark is not None and context_mark.line != mark.line:
        # "expected ',' or '}'" is found where the file ends; the brace that was never closed is here.
        problem += f" ({context} on line {context_mark.line + 1}, column {context_mark.column + 1})"
    return [(mark.line + 1, mark.column + 1, problem) if mark is not None else (None, None, problem)]


def dump_yaml(data: dict[str, Any]) -> str:
    """YAML text that :func:`parse_yaml` reads back as ``data`` (strings like '1e3' stay strings)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=None, width=100)
