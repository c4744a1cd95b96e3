"""Configs: configs/base.yaml declares every key and its default; other configs override it.

Any stage takes `-c configs/<exp>.yaml` plus `key.sub=value` overrides (values parsed as YAML,
so `train.folds=[0,2]` is a list). An unknown key is an error naming the closest valid one.
"""
from __future__ import annotations

import argparse
import copy
import difflib
import sys
import time
from pathlib import Path

import yaml

from pipeline.io import PROJECT_ROOT, stable_hash

BASE_CONFIG = PROJECT_ROOT / "configs" / "base.yaml"


class ConfigError(ValueError):
    pass


def _flat_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, dict) and value:
            keys.extend(_flat_keys(value, path + "."))
    return keys


def _unknown_key_error(key: str, schema: dict, source: str) -> ConfigError:
    valid = _flat_keys(schema)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{source}: unknown config key '{key}'{hint}")


def _check_type(key: str, default, value, source: str) -> None:
    if default is None or value is None:
        return
    number = (int, float)
    ok = (
        isinstance(value, bool) if isinstance(default, bool)
        else (isinstance(value, number) and not isinstance(value, bool)) if isinstance(default, number)
        else isinstance(value, type(default))
    )
    if not ok:
        raise ConfigError(f"{source}: '{key}' must be {type(default).__name__} like {default!r}, got {value!r}")


def _merge(root: dict, schema: dict, target: dict, updates: dict, source: str, prefix: str = "") -> None:
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in schema:
            raise _unknown_key_error(path, root, source)
        default = schema[key]
        if isinstance(default, dict) and default and isinstance(value, dict):
            _merge(root, default, target[key], value, source, path + ".")
        else:
            _check_type(path, default, value, source)
            target[key] = copy.deepcopy(value)


def _set_path(schema: dict, cfg: dict, dotted: str, value, source: str) -> None:
    parts = dotted.split(".")
    node_schema, node = schema, cfg
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        free_map = isinstance(node_schema, dict) and node_schema == {} and depth > 0
        if not free_map and (not isinstance(node_schema, dict) or part not in node_schema):
            raise _unknown_key_error(dotted, schema, source)
        if last:
            if not free_map:
                _check_type(dotted, node_schema[part], value, source)
            node[part] = value
        else:
            node_schema = node_schema.get(part, {}) if isinstance(node_schema, dict) else {}
            node = node.setdefault(part, {})


def parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{text}': value is not valid YAML ({error})") from error
    return key.strip(), value


def _schema() -> dict:
    with open(BASE_CONFIG) as handle:
        return yaml.safe_load(handle)


def load_config(path=None, overrides=()) -> dict:
    """Resolved config: base.yaml, then the file at `path`, then `key=value` overrides."""
    schema = _schema()
    cfg = copy.deepcopy(schema)
    name = "base"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        try:
            with open(path) as handle:
                updates = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from error
        if not isinstance(updates, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        _merge(schema, schema, cfg, updates, str(path))
        name = path.stem
    for text in overrides:
        key, value = parse_override(text)
        _set_path(schema, cfg, key, value, f"override '{text}'")
    cfg["name"] = name
    cfg["output"]["dir"] = str(cfg["output"]["dir"]).format(config=name)
    return cfg


def with_values(cfg: dict, values: dict, source: str = "override") -> dict:
    """A copy of a resolved config with dotted keys set, checked like command-line overrides."""
    schema = _schema()
    updated = copy.deepcopy(cfg)
    for key, value in values.items():
        _set_path(schema, updated, key, value, f"{source} '{key}'")
    return updated


def section_hash(cfg: dict, *sections: str) -> str:
    """Hash of the config sections an artifact depends on, so unrelated edits don't invalidate it."""
    return stable_hash({section: cfg.get(section) for section in sections})


def output_dir(cfg: dict, *parts: str) -> Path:
    return Path(cfg["output"]["dir"]).joinpath(*parts)


def stage_main(run, description: str, extra_args=None) -> None:
    """The thin CLI every stage shares: `python -m pipeline.<stage> -c CFG [--force] [key=value ...]`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-c", "--config", default=str(PROJECT_ROOT / "configs" / "demo.yaml"),
                        help="YAML config (default: configs/demo.yaml)")
    parser.add_argument("--force", action="store_true", help="redo work whose outputs already exist")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.folds=[0,2]")
    if extra_args:
        extra_args(parser)
    args = parser.parse_args()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    started = time.time()
    extra = {k: v for k, v in vars(args).items() if k not in ("config", "overrides", "force")}
    try:
        run(cfg, force=args.force, **extra)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as error:
        sys.exit(f"error: {error}")
    module = run.__module__ if run.__module__ != "__main__" else sys.modules["__main__"].__spec__.name
    print(f"[{module.split('.')[-1]}] done in {time.time() - started:.1f}s")
