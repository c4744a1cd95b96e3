"""Would every module of pipeline import on the GPU machine? Imports each one here, in this process, with only
the standard library, the GPU image's packages (bench/gpu-image-packages.txt) and the carried wheels
(bench/gpu-wheels.txt) importable.

    python bench/gpu_imports.py [--without DIST ...] [--modules MODULE ...] [--json]

Every module is imported, then every import inside its functions (kornia, cleanlab). A meta-path finder
and builtins.__import__ see each import, a package's own ones too (pydantic importing annotated_types), and
refuse a top-level name outside those three, as the image would. Imports made by the image's own packages
and by the standard library are let through (copy's optional `org`, sysconfig's `_sysconfigdata_*`): the
image's versions, not this machine's, decide what they need. A -NAME entry of the wheel list is a package
left behind on purpose; what needs it is named, not checked. Prints each import that fails, with the package
it lacks and who imported it, and each entry of the wheel list nothing imports; exits 1 on either.
"""
from __future__ import annotations

import argparse
import ast
import builtins
import importlib
import importlib.metadata
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE_PACKAGES = ROOT / "bench" / "gpu-image-packages.txt"
WHEELS = ROOT / "bench" / "gpu-wheels.txt"
GONE_IN_312 = {"asynchat", "asyncore", "distutils", "imp", "smtpd"}  # 3.11's standard library, not the image's 3.12
IMAGE_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "os_name": "posix",
                "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                "platform_python_implementation": "CPython", "extra": ""}  # markers, as the image evaluates them
IMPORT_MACHINERY = {"importlib", "importlib._bootstrap", "importlib._bootstrap_external"}


def normalized(name: str) -> str:
    """A distribution's name as PEP 503 compares them: scikit_learn, Scikit-Learn -> scikit-learn."""
    return re.sub(r"[-_.]+", "-", name).lower()


def listed(path: Path) -> dict[str, str]:
    """{normalized name: the entry} of a package list: one distribution a line (NAME, NAME==VERSION or -NAME), with
    # comments."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {normalized(re.split(r"[=<>!~ ]", line.lstrip("-"), maxsplit=1)[0]): line for line in lines if line}


def carried_wheels() -> dict[str, str]:
    """{name: NAME==VERSION} of bench/gpu-wheels.txt: the wheels gpu-wheels.sh downloads."""
    return {name: entry for name, entry in listed(WHEELS).items() if not entry.startswith("-")}


def not_carried_wheels() -> list[str]:
    """The -NAME entries of bench/gpu-wheels.txt: packages only code the GPU checks never run imports."""
    return [name for name, entry in listed(WHEELS).items() if entry.startswith("-")]


def _importer() -> str:
    """The module whose code asked for the import being found: the first frame outside the import machinery."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen") or frame.f_code is OnlyThese._import.__code__
                                 or frame.f_globals.get("__name__") in IMPORT_MACHINERY):
        frame = frame.f_back
    return frame.f_globals.get("__name__", "?") if frame is not None else "?"


class OnlyThese:
    """While installed (a context manager), a module is importable only if its top-level name is `allowed`, or if
    a `trusted` module (an image package, the standard library, or what those loaded: their needs are the
    image's business) imports it. It sees both ways in: the finders (a module not loaded yet, however it is
    asked for) and builtins.__import__ (every import statement, also of a module some image package loaded)."""

    def __init__(self, allowed: set[str], trusted: set[str]):
        self.allowed, self.trusted, self.refused = allowed, set(trusted), {}

    def refuses(self, top: str, importer: str) -> bool:
        if top in self.allowed:
            return False
        if importer.partition(".")[0] in self.trusted:
            self.trusted.add(top)  # this machine's version of an image package needs it: its own needs are its own
            return False
        self.refused[top] = importer
        return True

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if self.refuses(top, _importer()):
            raise ModuleNotFoundError(f"No module named {top!r} on the GPU image", name=top)
        return None  # the usual finders find it

    def _import(self, name, globals=None, locals=None, fromlist=(), level=0):
        top = name.partition(".")[0]
        if level == 0 and self.refuses(top, (globals or {}).get("__name__", "?")):
            raise ModuleNotFoundError(f"No module named {top!r} on the GPU image", name=top)
        return self._builtin_import(name, globals, locals, fromlist, level)

    def __enter__(self):
        self._builtin_import, builtins.__import__ = builtins.__import__, self._import
        sys.meta_path.insert(0, self)
        return self

    def __exit__(self, *exc_info):
        builtins.__import__ = self._builtin_import
        sys.meta_path.remove(self)


def pipeline_modules() -> dict[str, Path]:
    """{module name: its file} of every module of pipeline."""
    modules = {}
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def function_imports(path: Path) -> list[str]:
    """The absolute imports inside a module's functions (run when the function is): kornia in augment, say."""
    found = []
    for function in ast.walk(ast.parse(path.read_text())):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    found += [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.append(node.module)
    return found


def declared_needs(distribution: str) -> set[str]:
    """What a distribution installed here declares it requires on the image's Python (3.12, Linux), extras aside."""
    from packaging.requirements import Requirement

    needs = set()
    for text in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate(IMAGE_PYTHON):
            needs.add(normalized(requirement.name))
    return needs


def check(modules: dict[str, Path], without: set[str], absent: set[str] = frozenset()) -> dict:
    """{"failed": {what: why}, "skipped": {what: the package not carried}, "missing": {top-level name: its importer},
    "unused_wheels": [...]}: each module imported, then each import inside its functions. `absent`: distributions
    to treat as not installed here, as on the GPU image itself."""
    image, wheels, not_carried = set(listed(IMAGE_PACKAGES)), set(carried_wheels()) - without, set(not_carried_wheels())
    tops = importlib.metadata.packages_distributions()  # top-level name -> the distributions that install it
    providers = {top: {normalized(d) for d in dists} - absent for top, dists in tops.items()}
    trusted = {top for top, dists in providers.items() if dists & image}
    carried = {top: dists & wheels for top, dists in providers.items() if dists & wheels}
    excused = {top: sorted(dists & not_carried)[0] for top, dists in providers.items() if dists & not_carried}
    # a -NAME package not installed where this runs (the GPU image itself): its likely top-level name. Found on the
    # H200, 2026-12-04: without this the check failed there on the very packages it leaves behind on purpose
    excused |= {name.replace("-", "_"): name for name in not_carried if name not in excused.values()}
    trusted |= {name.replace("-", "_") for name in image}  # an image package not installed here: its likely name
    stdlib = set(sys.stdlib_module_names) - GONE_IN_312
    allowed = stdlib | {"pipeline"} | trusted | set(carried)
    sys.path.insert(0, str(ROOT))
    failed, skipped = {}, {}
    attempts = [(module, module, module) for module in modules]
    attempts += [(f"{module} (inside a function: import {name})", module, name)
                 for module, path in modules.items() for name in function_imports(path)
                 if name.partition(".")[0] not in stdlib | {"pipeline"}]
    with OnlyThese(allowed, trusted | stdlib) as finder:
        for what, module, name in attempts:
            top = name.partition(".")[0]
            try:
                if finder.refuses(top, module):  # it may be loaded already (by an image package): ask anyway
                    raise ModuleNotFoundError(name=top)
                importlib.import_module(name)
            except ModuleNotFoundError as error:
                top = (error.name or "?").partition(".")[0]
                if top in excused:
                    skipped[what] = excused[top]
                else:
                    failed[what] = f"needs {top!r} (imported by {finder.refused.get(top, '?')})"
            except Exception as error:  # noqa: BLE001 - any failure to import is this check's finding
                failed[what] = f"{type(error).__name__}: {str(error)[:300]}"
    imported = {name.partition(".")[0] for name in list(sys.modules)}
    used = set().union(*(carried[top] for top in imported if top in carried))
    needs = {wheel: declared_needs(wheel) for wheel in sorted(wheels)}  # imported or not: optuna's alembic (RDB storage)
    for wheel, wanted in needs.items():
        for need in sorted(wanted - image - wheels):
            failed[f"{wheel} (its declared requirements)"] = f"needs {need!r}"
    while more := set().union(*(needs[wheel] for wheel in used)) & wheels - used:
        used |= more
    return {"failed": failed, "skipped": skipped, "missing": {top: finder.refused[top] for top in sorted(finder.refused)},
            "unused_wheels": sorted(wheels - used), "unused_exclusions": sorted(not_carried - set(skipped.values()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--without", nargs="*", default=[], help="leave these wheels of bench/gpu-wheels.txt out")
    parser.add_argument("--modules", nargs="*", default=None, help="only these modules (default: every one)")
    parser.add_argument("--absent", nargs="*", default=[],
                        help="treat these distributions as not installed here (as on the GPU image)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    modules = pipeline_modules()
    chosen = {name: modules[name] for name in args.modules} if args.modules else modules
    result = check(chosen, {normalized(name) for name in args.without}, {normalized(name) for name in args.absent})
    if args.json:
        print(json.dumps(result))
    else:
        for what, reason in result["failed"].items():
            print(f"{what}: {reason}, neither in the image ({IMAGE_PACKAGES.name}) nor in {WHEELS.name}")
        for what, name in result["skipped"].items():
            print(f"{what}: not checked, it needs {name} (not carried: see {WHEELS.name})")
        for name in result["unused_wheels"] + result["unused_exclusions"]:
            print(f"{WHEELS.name}: {name} is imported by no module of pipeline")
        print("every module of pipeline imports with the image's packages and the wheels" if not result["failed"]
              else f"{len(result['failed'])} import(s) would fail on the GPU image")
    sys.exit(1 if result["failed"] or result["unused_wheels"] or result["unused_exclusions"] else 0)


if __name__ == "__main__":
    main()
