"""Configs: configs/base.yaml declares every key and its default; other configs override it.

Any stage takes `-c configs/<exp>.yaml` plus `key.sub=value` overrides (values parsed as YAML,
so `train.folds=[0,2]` is a list). An unknown key is an error naming the closest valid one. After
merging, path values may use `{config}` (the config file's stem) and `{data.root}` (or any other
string key), and every value is checked against pipeline/schema.py: one ConfigError lists every bad
key, so a typo stops the run at load rather than an hour into training.

Config text is bounded before YAML expands it: a file is at most MAX_CONFIG_BYTES, and YAML aliases
(`*name`) are refused in files and overrides alike (no shipped config uses one, and a few lines of
nested aliases expand to gigabytes).
"""
from __future__ import annotations

import copy
import difflib
import re
from pathlib import Path

import yaml

from pipeline.errors import ConfigError
from pipeline.io import PROJECT_ROOT, redacted
from pipeline.schema import config_problems

BASE_CONFIG = PROJECT_ROOT / "configs" / "base.yaml"

# values that are paths: they may name other keys as {data.root} and the config as {config}
PATH_KEYS = ("data.root", "data.label_fixes", "data.cache_dir", "faces.dir", "synth.out", "output.dir", "folds.dir",
             "pseudo.labels", "distill.teacher")
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
LEADING_PLACEHOLDER = re.compile(r"^\{[A-Za-z_][\w.]*\}")
MAX_CONFIG_BYTES = 1 << 20  # base.yaml is 12 KB
_MISSING = object()


class _AliasFound(Exception):
    def __init__(self, anchor: str, line: int):
        super().__init__(anchor, line)
        self.anchor, self.line = anchor, line


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.safe_load that stops at the first alias, before anything is expanded."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasFound(event.anchor, event.start_mark.line + 1)
        return super().compose_node(parent, index)


def _yaml_value(text, source: str, lines: bool = True):
    """safe_load of config text; an alias is a ConfigError naming `source` (and, for a file, the line)."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except _AliasFound as found:
        where = f"{source} line {found.line}" if lines else source
        raise ConfigError(f"{where}: YAML alias *{found.anchor} refused: aliases are not "
                          f"allowed in config files or overrides (nested ones expand to gigabytes); write the value "
                          f"out") from None


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, dict) and value:
            keys.extend(_flat_keys(value, path + "."))
    return keys


# keys that were renamed or replaced: what an old config reads instead of "unknown key"
RETIRED = {
    "train.amp": "train.amp was replaced by train.precision (auto | bf16 | fp16 | fp32): for amp: true write "
                 "precision: auto (bf16 where the GPU has it, else fp16 with a gradient scaler); for amp: false write "
                 "precision: fp32",
}


def _unknown_key_error(key: str, schema: dict, source: str) -> ConfigError:
    if key in RETIRED:
        return ConfigError(f"{source}: {RETIRED[key]}")
    valid = _flat_keys(schema)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(redacted(f"{source}: unknown config key '{key}'{hint}"))


def _merge(root: dict, schema: dict, target: dict, updates: dict, source: str, prefix: str = "") -> None:
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in schema:
            raise _unknown_key_error(path, root, source)
        default = schema[key]
        if isinstance(default, dict) and default and isinstance(value, dict):
            _merge(root, default, target[key], value, source, path + ".")
        else:
            target[key] = copy.deepcopy(value)  # its value is checked by pipeline/schema.py after merging


def _set_path(schema: dict, cfg: dict, dotted: str, value, source: str) -> None:
    parts = dotted.split(".")
    node_schema, node = schema, cfg
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        free_map = isinstance(node_schema, dict) and node_schema == {} and depth > 0
        if not free_map and (not isinstance(node_schema, dict) or part not in node_schema):
            raise _unknown_key_error(dotted, schema, source)
        if last:
            node[part] = value
        else:
            node_schema = node_schema.get(part, {}) if isinstance(node_schema, dict) else {}
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # e.g. `model.head_weights=3` then `model.head_weights.age=2`
                raise ConfigError(f"{source}: '{'.'.join(parts[:depth + 1])}' is {node!r}, not a mapping")


def parse_override(text: str) -> tuple[str, object]:
    """`key.sub=value` -> (key, value parsed as YAML); a value starting with a placeholder stays a string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key.sub=value")
    key, raw = text.split("=", 1)
    if LEADING_PLACEHOLDER.match(raw):
        # YAML would read `{data.root}/x.csv` as a broken flow mapping; a path is meant
        return key.strip(), raw
    try:
        value = _yaml_value(raw, f"override '{text[:200]}'", lines=False) if raw != "" else ""
    except yaml.YAMLError as error:
        raise ConfigError(redacted(f"override '{text}': value is not valid YAML ({error})")) from error
    return key.strip(), value


def _schema() -> dict:
    return _yaml_value(BASE_CONFIG.read_text(), str(BASE_CONFIG))


def _read_config_file(path: Path) -> dict:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:  # a folder, no permission
        raise ConfigError(f"config file {path}: cannot read ({error.strerror or error})") from error
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path}: more than {MAX_CONFIG_BYTES} bytes; a config holds settings, "
                          f"not data (base.yaml is {BASE_CONFIG.stat().st_size} bytes)")
    try:
        updates = _yaml_value(text, str(path)) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(updates, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return updates


def load_config(path=None, overrides=()) -> dict:
    """Resolved config: base.yaml, then the file at `path`, then `key=value` overrides; placeholders
    filled in and every value checked (ConfigError naming each bad key)."""
    schema = _schema()
    cfg = copy.deepcopy(schema)
    name = "base"
    if path is not None:
        path = Path(path)
        _merge(schema, schema, cfg, _read_config_file(path), str(path))
        name = path.stem
    for text in overrides:
        key, value = parse_override(text)
        _set_path(schema, cfg, key, value, f"override '{text}'")
    cfg["name"] = name
    source = str(path if path is not None else BASE_CONFIG.relative_to(PROJECT_ROOT))
    if overrides:
        source += " with overrides " + " ".join(overrides)
    return _resolved_and_checked(cfg, schema, source)


def with_values(cfg: dict, values: dict, source: str = "override") -> dict:
    """A copy of a resolved config with dotted keys set, checked like command-line overrides
    (placeholders in the new values are filled in; the others were filled when `cfg` was loaded)."""
    schema = _schema()
    updated = copy.deepcopy(cfg)
    for key, value in values.items():
        _set_path(schema, updated, key, value, f"{source} '{key}'")
    shown = ", ".join(f"{key}={value!r}" for key, value in values.items())
    return _resolved_and_checked(updated, schema, f"{source} ({shown})")


def _resolved_and_checked(cfg: dict, schema: dict, source: str) -> dict:
    """Fill placeholders, then check every value; one ConfigError lists all problems of both kinds."""
    known_keys = [key for key in _flat_keys(schema) if "." in key]
    problems = _fill_placeholders(cfg, known_keys)
    problems += [line for line in config_problems(cfg, known_keys) if line not in problems]
    if problems:
        count = f"{len(problems)} invalid config value{'s' if len(problems) > 1 else ''}"
        # redacted: a storage URL's password must not reach a terminal or a log through its error
        raise ConfigError(redacted(f"{source}: {count}:\n  " + "\n  ".join(problems)))
    return cfg


# ---- placeholders: {config} and {dotted.key} in path values ----

def _lookup(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _path_values(cfg: dict):
    """(key, container, slot) of every path value that may hold placeholders."""
    for key in PATH_KEYS:
        section, name = key.split(".")
        if isinstance(cfg.get(section), dict):
            yield key, cfg[section], name
    files = _lookup(cfg, "model.pretrained_files")
    if isinstance(files, dict):
        for backbone in files:
            yield f"model.pretrained_files.{backbone}", files, backbone


def _fill_placeholders(cfg: dict, known_keys: list[str]) -> list[str]:
    """Replace placeholders in path values in place; return a problem line for each that cannot be filled."""
    problems: list[str] = []
    for key, container, slot in _path_values(cfg):
        if isinstance(container[slot], str):
            container[slot] = _fill(cfg, key, container[slot], known_keys, problems, chain=(key,))
    return list(dict.fromkeys(problems))


def _fill(cfg: dict, key: str, text: str, known_keys: list[str], problems: list[str], chain: tuple) -> str:
    def replace(match: re.Match) -> str:
        ref = match.group(1)
        if ref == "config" and cfg.get("name"):
            return str(cfg["name"])
        value = _lookup(cfg, ref)
        problem = _placeholder_problem(ref, value, chain, known_keys)
        if problem:
            problems.append(f"{key} = {text!r}: {problem}")
            return match.group(0)
        # a referenced path may itself use placeholders ({data.cache_dir} -> {data.root}/cache)
        return _fill(cfg, ref, str(value), known_keys, problems, chain + (ref,))

    return PLACEHOLDER.sub(replace, text)


def _placeholder_problem(ref: str, value, chain: tuple, known_keys: list[str]) -> str | None:
    if ref == "config":
        return "placeholder {config} needs the config's name (cfg['name'], set by load_config)"
    if value is _MISSING:
        close = difflib.get_close_matches(ref, ["config", *known_keys], n=1)
        hint = f"; did you mean {{{close[0]}}}?" if close else ""
        return f"placeholder {{{ref}}} names no config key{hint} (use {{config}} or a key such as {{data.root}})"
    if ref in chain:
        return f"placeholders loop: {' -> '.join(chain + (ref,))}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return f"placeholder {{{ref}}} must name a string or integer key; {ref} is {value!r}"
    return None
