"""A subcommand's options from a YAML file (`sparse-eqv finetune --config FILE.yaml`).

The option table is the subcommand's argparse parser itself: every option it
declares is a key of the file, spelt as its long flag with dashes or
underscores (`threshold-decay: 0.3` or `threshold_decay: 0.3`; `-o/--output`
is `output`; a positional argument by its name, `model`). Values come in
three layers, a later one winning: the parser's defaults, the file, the
command line. A command-line flag that overrides a different value from the
file is reported in one line naming the key and both values.

A value from the file is checked as the command line checks it: a YAML
string goes through the option's own argparse type (so `lr: 1e-3`, a string
to YAML, is the float 0.001), a number must suit the type, a value must be
among the option's choices, `true`/`false` for switches, a list (or a single
value) for options taking several. Relative paths are relative to the working
directory, as on the command line. `write_config` writes the effective
options back with absolute paths, so `--config RUN_DIR/config.yaml` repeats
a run. Every problem is a SparseEqvError naming the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
from pathlib import Path
from typing import Any, Callable, Iterable

from sparse_eqv.atomic_write import atomic_file
from sparse_eqv.errors import SparseEqvError

CONFIG_DEST = "config"
TABLE_DEST = "option_table"


# The command-line default of every option of a parser that accepts a config file: "not given here".
UNSET = object()

_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", Path: "a path"}


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of the parser, as a config-file key.

    Attributes:
        key: the argparse dest, e.g. "threshold_decay".
        spelling: how the command line names it, e.g. "--threshold-decay".
        default: the parser's default (string defaults converted by `convert`).
        convert: the argparse type (str when the option has none).
        switch: a store_true flag (the file gives true or false).
        many: takes one or more values (nargs "+" or "*").
        choices: the allowed values, or None.
        required: must end up with a value (from the file or the command line).
    """

    key: str
    spelling: str
    default: Any
    convert: Callable[[str], Any]
    switch: bool
    many: bool
    choices: tuple | None
    required: bool

    @classmethod
    def from_action(cls, action: argparse.Action) -> "Option":
        if not isinstance(action, (argparse._StoreAction, argparse._StoreTrueAction)):
            raise TypeError(f"{action.dest}: {type(action).__name__} options cannot come from a config file")
        convert = action.type or str
        default = convert(action.default) if isinstance(action.default, str) else action.default
        spelling = max(action.option_strings, key=len) if action.option_strings else action.dest
        return cls(
            key=action.dest, spelling=spelling, default=default, convert=convert,
            switch=isinstance(action, argparse._StoreTrueAction), many=action.nargs in ("+", "*"),
            choices=tuple(action.choices) if action.choices is not None else None, required=action.required,
        )

    @property
    def expected(self) -> str:
        """What the file may give, in words."""
        if self.switch:
            return "true or false"
        one = f"one of {', '.join(map(str, self.choices))}" if self.choices else _TYPE_NAMES.get(
            self.convert, f"a {getattr(self.convert, '__name__', 'value')}")
        text = f"{one}, or a list of them" if self.many else one
        return f"{text}, or null" if self.default is None and not self.required else text

    def parse(self, value: Any, where: str) -> Any:
        """The file's `value` as the command line would have given it; SparseEqvError
        starting with `where` (file and key as the file spells it) otherwise."""
        if value is None and self.default is None and not self.required:
            return None
        if self.switch:
            if isinstance(value, bool):
                return value
            raise self._wrong(value, where)
        if self.many:
            values = value if isinstance(value, list) else [value]
            if not values:
                raise self._wrong(value, where)
            return [self._one(v, value, where) for v in values]
        return self._one(value, value, where)

    def _one(self, value: Any, whole: Any, where: str) -> Any:
        try:
            if isinstance(value, str):
                converted = self.convert(value)
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError
            elif self.convert is float:
                converted = float(value)
            elif self.convert is int and isinstance(value, int):
                converted = value
            elif self.convert is str:  # e.g. `threshold-decay: 0.05` for a flag parsed later
                converted = str(value)
            else:
                raise ValueError
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            raise self._wrong(whole, where) from None
        if self.choices is not None and converted not in self.choices:
            raise self._wrong(whole, where)
        return converted

    def _wrong(self, value: Any, where: str) -> SparseEqvError:
        return SparseEqvError(f"{where} {_yaml_text(value)}: expected {self.expected}")


def _yaml_text(value: Any) -> str:
    """`value` as the YAML file wrote it, roughly (null, true, 'text', 1.5, [..])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return f"[{', '.join(map(_yaml_text, value))}]"
    return repr(value)


@dataclasses.dataclass(frozen=True)
class OptionTable:
    """The options of a parser that accepts a config file, by key in the parser's
    order, and its groups of mutually exclusive keys."""

    command: str
    options: dict[str, Option]
    exclusive: tuple[tuple[str, ...], ...]

    def partners(self, key: str) -> list[str]:
        """The keys that exclude `key` (its mutually exclusive group but itself)."""
        return [k for group in self.exclusive if key in group for k in group if k != key]


def accept_config(parser: argparse.ArgumentParser) -> None:
    """Add `--config FILE.yaml` to `parser` (call it after every other option).

    Every option already declared becomes a key of the file: its default moves
    into the option table (stored in the parsed namespace, for `resolve`) and
    becomes UNSET on the command line, and a required option (positional ones
    included) becomes optional there; `resolve` applies the defaults and checks
    the required options once file and command line are merged.
    """
    options = {}
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        options[action.dest] = Option.from_action(action)
        action.default, action.required = UNSET, False
        if not action.option_strings:
            action.nargs = "?"
    exclusive = tuple(tuple(a.dest for a in group._group_actions) for group in parser._mutually_exclusive_groups)
    parser.add_argument(f"--{CONFIG_DEST}", type=Path, default=None, metavar="FILE.yaml",
                        help="take options from this YAML file (keys: the long option names, e.g. threshold-decay, "
                             "and model); flags given here override it")
    parser.set_defaults(**{TABLE_DEST: OptionTable(parser.prog, options, exclusive)})


def read_config(path: Path, table: OptionTable) -> dict[str, Any]:
    """The options a YAML file gives, by key, checked (`Option.parse`);
    SparseEqvError naming the file for a missing or malformed file, an unknown
    key (with the closest known one), a key given twice, a wrong value, or two
    keys that exclude each other."""
    import yaml

    if not path.is_file():
        raise SparseEqvError(f"{path}: no such config file")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise SparseEqvError(f"{path}{line}: not valid YAML ({getattr(error, 'problem', None) or error})") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise SparseEqvError(f"{path}: expected a mapping of option names to values, found a {type(content).__name__}")
    values: dict[str, Any] = {}
    for name, value in content.items():
        key = str(name).replace("-", "_")
        if key not in table.options:
            raise SparseEqvError(f"{path}: unknown option `{name}`{_suggestion(str(name), table.options)}; "
                                 f"the keys are the long options of `{table.command} --help`")
        if key in values:
            raise SparseEqvError(f"{path}: `{key}` given twice (dashes and underscores name the same option)")
        values[key] = table.options[key].parse(value, f"{path}: `{name}:`")
    for group in table.exclusive:
        set_here = [k for k in group if k in values and values[k] != table.options[k].default]
        if len(set_here) > 1:
            raise SparseEqvError(f"{path}: `{set_here[0]}` and `{set_here[1]}` exclude each other: give one")
    return values


def _suggestion(name: str, keys: Iterable[str]) -> str:
    close = difflib.get_close_matches(name.replace("-", "_"), list(keys), n=1)
    if not close:
        return ""
    return f" (did you mean `{close[0].replace('_', '-') if '-' in name else close[0]}`?)"


def resolve(args: argparse.Namespace, report: Callable[[str], None] = print) -> argparse.Namespace:
    """The effective options of a parse by a parser `accept_config` prepared:
    the parser's defaults, overridden by `--config`'s file, overridden by the
    flags given on the command line. `report` gets one line per flag that
    overrides a different value from the file (naming the key and both
    values). SparseEqvError when the file is bad (`read_config`) or a required
    option has no value."""
    table: OptionTable = getattr(args, TABLE_DEST)
    path = getattr(args, CONFIG_DEST)
    given = {key: getattr(args, key) for key in table.options if getattr(args, key) is not UNSET}
    from_file = read_config(path, table) if path is not None else {}
    values = {key: option.default for key, option in table.options.items()}
    values.update(from_file)
    for key, value in given.items():
        spelling = table.options[key].spelling
        for other in table.partners(key):
            if other in from_file and other not in given and from_file[other] != table.options[other].default:
                report(f"note: {spelling} {_show(value)} on the command line replaces `{other}: "
                       f"{_show(from_file[other])}` in {path} (they exclude each other)")
                values[other] = table.options[other].default
        if key in from_file and _comparable(from_file[key]) != _comparable(value):
            report(f"note: {spelling} {_show(value)} on the command line overrides `{key}: {_show(from_file[key])}` "
                   f"in {path}")
        values[key] = value
    for key, option in table.options.items():
        if option.required and values[key] is None:
            flag = option.spelling if option.spelling.startswith("-") else f"the {key} argument"
            raise SparseEqvError(f"`{key}` is required: give {flag} on the command line or `{key}:` in the config file")
    return argparse.Namespace(**{**vars(args), **values})


def _comparable(value: Any) -> Any:
    if isinstance(value, Path):
        return value.absolute()
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def _show(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def write_config(path: str | Path, args: argparse.Namespace, *, leave_out: Iterable[str] = ()) -> Path:
    """Write the effective options of `args` (from `resolve`) as YAML to
    `path`, atomically, in the parser's order, paths absolute; keys in
    `leave_out` are not written, nor, of a group of mutually exclusive options
    one of which has a value other than its default, the others (so
    `read_config` takes the file back). Returns `path`."""
    import yaml

    table: OptionTable = getattr(args, TABLE_DEST)
    skip = set(leave_out)
    for group in table.exclusive:
        if any(getattr(args, k) != table.options[k].default for k in group):
            skip |= {k for k in group if getattr(args, k) == table.options[k].default}
    values = {key: _plain(getattr(args, key)) for key in table.options if key not in skip}
    header = (f"# {table.command} options, written {datetime.datetime.now().isoformat(timespec='seconds')}.\n"
              f"# Repeat the run: {table.command} --config {Path(path).absolute()} -o NEW_DIR\n")
    with atomic_file(path) as tmp:
        tmp.write_text(header + yaml.safe_dump(values, sort_keys=False, allow_unicode=True))
    return Path(path)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value.absolute())
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
