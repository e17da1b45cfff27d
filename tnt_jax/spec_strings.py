"""The "field=value+field=value" strings that flags and config files give for small frozen
dataclasses (`MemoryModel.from_spec`, `KernelBlocks.from_spec`): one parser, so both name a bad
entry the same way."""

from __future__ import annotations

from typing import Callable, Iterable


def parse_fields(entries: Iterable[str], converters: dict[str, tuple[Callable[[str], object], str]],
                 what: str) -> dict:
  """{field: value} from "field=value" entries. converters: {field: (convert, what it takes, as
  "an integer")}; `what` names the whole string in errors. An entry without "=", an unknown field
  or a value its convert rejects (ValueError) raises ValueError naming it."""
  fields = {}
  for entry in entries:
    name, sep, value = entry.partition("=")
    if not sep or name not in converters:
      raise ValueError(f"{what}: {entry!r} must be field=value with field in "
                       f"{tuple(converters)}")
    convert, takes = converters[name]
    try:
      fields[name] = convert(value)
    except ValueError:
      raise ValueError(f"{what}: {name}={value!r} is not {takes}") from None
  return fields


def natural(value: str) -> int:
  """A non-negative integer written in digits (no sign, no spaces)."""
  if not value.isdigit():
    raise ValueError(value)
  return int(value)


def boolean(value: str) -> bool:
  """"true" or "false" (any case)."""
  if value.lower() not in ("true", "false"):
    raise ValueError(value)
  return value.lower() == "true"
