"""Load an experiment config from `FILE.py[:ARG]` and apply `--config.key=value` overrides.

The syntax is that of ml_collections' `config_flags`, which reads `sys.argv`
through absl's global flags. This small parser works inside `uem-ich` and in
tests, and it reports every problem as a ConfigError that names the file or
the key.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections

from uem_ich_jax.errors import InputError

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


class ConfigError(InputError):
  """A config file, argument or override that cannot be used; the message names it."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Run `get_config(arg)` of `FILE.py[:ARG]` and return the config, locked."""
  path_text, _, arg = spec.partition(":")
  path = pathlib.Path(path_text)
  if path.suffix != ".py" or not path.is_file():
    raise ConfigError(f"config file {path} does not exist or is not a .py file")
  module_spec = importlib.util.spec_from_file_location(f"uem_ich_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as error:
    raise ConfigError(f"config file {path} failed to load: {type(error).__name__}: {error}") from error
  get_config = getattr(module, "get_config", None)
  if get_config is None:
    raise ConfigError(f"config file {path} defines no get_config(arg)")
  try:
    config = get_config(arg) if arg else get_config()
  except Exception as error:
    raise ConfigError(f"{path}: get_config({arg!r}) failed: {type(error).__name__}: {error}") from error
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config returned {type(config).__name__}, not a ConfigDict")
  config.lock()
  return config


def _parse_value(key: str, text: str, current: Any) -> Any:
  if isinstance(current, ml_collections.ConfigDict):
    raise ConfigError(f"--config.{key} is a group of fields; set one of them, for example"
                      f" --config.{key}.{next(iter(current.keys()), 'field')}=...")
  if isinstance(current, bool):
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise ConfigError(f"--config.{key}={text}: expected true or false")
  if isinstance(current, (int, float)):
    kind = type(current)
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"--config.{key}={text}: expected a number ({kind.__name__})")
    if kind is int and value != int(value):
      raise ConfigError(f"--config.{key}={text}: expected an integer")
    return kind(value)
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      # A bare word: a one-element sequence of strings.
      value = (text,)
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return type(current)(value)
  if current is None:
    try:
      return ast.literal_eval(text)
    except (ValueError, SyntaxError):
      return text
  return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
  """Apply overrides such as `--config.optim.head_lr=3e-4` (or `config.optim.head_lr=3e-4`)."""
  for override in overrides:
    text = override.lstrip("-")
    if not text.startswith("config.") or "=" not in text:
      raise ConfigError(f"{override!r} is not an override of the form --config.key=value")
    key, _, raw = text[len("config."):].partition("=")
    *parents, leaf = key.split(".")
    node = config
    for depth, part in enumerate(parents + [leaf]):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(part, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        where = ".".join(["config"] + (parents + [leaf])[:depth]) or "config"
        raise ConfigError(f"--config.{key}: {where} has no field {part!r}{hint}")
      if depth < len(parents):
        node = node[part]
    value = _parse_value(key, raw, node[leaf])
    try:
      with node.ignore_type():
        node[leaf] = value
    except (TypeError, ValueError, AttributeError, KeyError) as error:
      raise ConfigError(f"--config.{key}={raw}: {error}") from error


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """`load_config_file(spec)` with `overrides` applied."""
  config = load_config_file(spec)
  apply_overrides(config, overrides)
  return config
