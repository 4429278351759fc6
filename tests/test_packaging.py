"""Packaging guards for the four folders mapped into the ``stepsource`` namespace.

``pyproject.toml`` maps ``aggregates/``, ``projections/``, ``adapters/`` and ``engine/`` to
``stepsource.*`` with ``[tool.setuptools.package-dir]`` and lists every package explicitly.
A subpackage missing from ``[tool.setuptools] packages`` is silently dropped from the wheel
(DESIGN.md "Layers and folders", STYLE.md 9), and the bare folder names must never be
importable, or classes end up defined twice under two module names. These tests guard:

1. every package directory on disk is listed, and every listed package ships ``py.typed``;
2. the built wheel, installed in a clean venv, contains and imports every source module, and
   ``import engine`` (etc.) fails there;
3. the development install (strict editable) exposes ``stepsource.engine`` but not ``engine``.

Nothing here names a particular module: the tests compare what is on disk at run time with
what the build produces, so they hold while the packages are still being filled in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DIST = "stepsource"
BARE_NAMES = ("engine", "aggregates", "adapters", "projections")
SUBPROCESS_TIMEOUT = 240.0

# Top-level entries of the repository that are not part of a build's input: the venv, git,
# build output (``build/`` also holds the strict editable link tree) and caches.
_NOT_SOURCE = {
    ".venv",
    ".git",
    "build",
    "dist",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
}


# --- reading the build configuration -------------------------------------------------------


def _setuptools_config(root: Path) -> dict[str, Any]:
    with (root / "pyproject.toml").open("rb") as f:
        config: dict[str, Any] = tomllib.load(f)["tool"]["setuptools"]
    return config


def _listed_packages(root: Path) -> list[str]:
    packages: list[str] = _setuptools_config(root)["packages"]
    return packages


def _package_dir_map(root: Path) -> dict[str, str]:
    mapping: dict[str, str] = _setuptools_config(root).get("package-dir", {})
    return mapping


def _source_dir(package: str, package_dir: Mapping[str, str], root: Path) -> Path:
    """The folder setuptools reads ``package`` from: the longest mapped prefix, then the rest."""
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in package_dir:
            return root.joinpath(package_dir[prefix], *parts[i:])
    return root.joinpath(package_dir.get("", "."), *parts)


def _mapped_roots(root: Path) -> dict[str, Path]:
    """Dotted package name -> folder, for every mapping in ``package-dir``."""
    return {name: root / folder for name, folder in _package_dir_map(root).items() if name}


def _source_files(root: Path, pattern: str) -> Iterable[tuple[str, Path, Path]]:
    """(mapped package, its folder, matching file) for every file under a mapped folder."""
    for package, folder in _mapped_roots(root).items():
        for path in sorted(folder.rglob(pattern)):
            if "__pycache__" not in path.relative_to(folder).parts:
                yield package, folder, path


def _dotted(package: str, folder: Path, path: Path) -> str:
    """The module name of source file ``path`` found under ``folder`` (mapped to ``package``)."""
    parts = [package, *path.relative_to(folder).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _packages_on_disk(root: Path) -> set[str]:
    """Every folder holding an ``__init__.py`` under a mapped folder, as a package name."""
    return {_dotted(pkg, folder, path) for pkg, folder, path in _source_files(root, "__init__.py")}


def _source_modules(root: Path) -> set[str]:
    """Every ``.py`` file under a mapped folder, as the module name it should have installed."""
    return {_dotted(pkg, folder, path) for pkg, folder, path in _source_files(root, "*.py")}


# --- 1. the package list matches the folders ------------------------------------------------


def test_every_package_folder_on_disk_is_listed() -> None:
    on_disk = _packages_on_disk(REPO)
    assert DIST in on_disk, "the package-dir mapping no longer finds the stepsource package"
    unlisted = sorted(on_disk - set(_listed_packages(REPO)))
    assert not unlisted, (
        f"package folders not in [tool.setuptools] packages of pyproject.toml: {unlisted}; "
        "setuptools silently leaves them out of the wheel"
    )


def test_every_listed_package_exists_and_ships_py_typed() -> None:
    package_dir = _package_dir_map(REPO)
    problems = []
    for package in _listed_packages(REPO):
        folder = _source_dir(package, package_dir, REPO)
        if not (folder / "__init__.py").is_file():
            problems.append(f"{package}: no {folder.relative_to(REPO)}/__init__.py")
        if not (folder / "py.typed").is_file():
            problems.append(f"{package}: no {folder.relative_to(REPO)}/py.typed")
    assert not problems, "\n".join(problems)


# --- 2. the wheel, installed in a clean venv ------------------------------------------------


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"command failed with exit code {proc.returncode}: {cmd}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


def _ignore_non_source(src: str, names: list[str]) -> set[str]:
    ignored = {
        n
        for n in names
        if n == "__pycache__" or n.endswith((".egg-info", ".db", ".db-wal", ".db-shm"))
    }
    if Path(src) == REPO:
        ignored |= _NOT_SOURCE & set(names)
    return ignored


# Run by the clean venv's python with -I from an empty folder: imports stepsource, every
# listed package and every module pkgutil finds, and tries the bare folder names.
_PROBE = textwrap.dedent(
    """
    import importlib, importlib.util, json, pkgutil, sys, traceback

    listed, bare = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    found, failed = {}, {}

    def load(name):
        if name.endswith(".__main__"):  # a program: present is enough, running it is not wanted
            found[name] = importlib.util.find_spec(name).origin
            return
        try:
            found[name] = importlib.import_module(name).__file__
        except BaseException:
            failed[name] = traceback.format_exc()

    def on_error(name):
        failed.setdefault(name, traceback.format_exc())

    for name in ["stepsource", *listed]:
        load(name)
    if "stepsource" in found:
        import stepsource

        for info in pkgutil.walk_packages(stepsource.__path__, "stepsource.", onerror=on_error):
            if info.name not in found and info.name not in failed:
                load(info.name)

    bare_results = {}
    for name in bare:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            bare_results[name] = ["ModuleNotFoundError", exc.name]
        else:
            bare_results[name] = ["imported", None]

    report = {"prefix": sys.prefix, "found": found, "failed": failed, "bare": bare_results}
    print(json.dumps(report))
    """
)


@dataclass(frozen=True)
class InstalledWheel:
    source_modules: set[str]
    listed_packages: list[str]
    wheel_members: list[str]
    venv_prefix: str
    imported: dict[str, str]
    failed: dict[str, str]
    bare: dict[str, tuple[str, str | None]]


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> InstalledWheel:
    """Build the wheel, install it with its dependencies in a fresh venv, probe it once.

    The build reads a snapshot of the working tree, not the repository itself: the repo's
    ``build/`` may hold stale ``build/lib`` files that would mask a dropped module, and it
    holds the strict editable link tree that other engineers' ``make venv`` rewrites.
    """
    base = tmp_path_factory.mktemp("packaging")
    src = base / "src"
    shutil.copytree(REPO, src, ignore=_ignore_non_source, symlinks=True)

    dist = base / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)], cwd=base)
    wheels = sorted(dist.glob("*.whl"))
    assert len(wheels) == 1, f"expected one wheel, got {wheels}"

    # A venv without pip (faster); this repo venv's pip installs into it through --python.
    # Every optional extra comes along, since every module is imported: stepsource.testing
    # needs hypothesis, adapters.nats needs nats-py, adapters.redis redis-py,
    # adapters.postgres psycopg, payload encryption pycryptodome, the web UI (engine.ui)
    # Starlette and Jinja2, tracing and metrics (stepsource.otel, stepsource.metrics)
    # OpenTelemetry and prometheus-client.
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base)
    python = venv / "bin" / "python"
    requirement = (
        f"stepsource[testing,nats,redis,postgres,crypto,ui,otel] @ {wheels[0].resolve().as_uri()}"
    )
    _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", requirement],
        cwd=base,
    )

    listed = _listed_packages(src)
    empty = base / "cwd"
    empty.mkdir()
    probe = _run(
        [str(python), "-I", "-c", _PROBE, json.dumps(listed), json.dumps(list(BARE_NAMES))],
        cwd=empty,
    )
    report: dict[str, Any] = json.loads(probe.stdout.strip().splitlines()[-1])
    with zipfile.ZipFile(wheels[0]) as zf:
        members = zf.namelist()
    return InstalledWheel(
        source_modules=_source_modules(src),
        listed_packages=listed,
        wheel_members=members,
        venv_prefix=str(report["prefix"]),
        imported={str(k): str(v) for k, v in report["found"].items()},
        failed={str(k): str(v) for k, v in report["failed"].items()},
        bare={str(k): (str(v[0]), v[1]) for k, v in report["bare"].items()},
    )


def _wheel_modules(members: Iterable[str]) -> set[str]:
    modules = set()
    for member in members:
        if member.endswith(".py") and member.split("/", 1)[0] == DIST:
            parts = member.removesuffix(".py").split("/")
            if parts[-1] == "__init__":
                parts.pop()
            modules.add(".".join(parts))
    return modules


def _diff(expected: set[str], actual: set[str], what: str) -> str:
    return (
        f"{what}\n  missing: {sorted(expected - actual)}\n  unexpected: {sorted(actual - expected)}"
    )


@pytest.mark.slow
def test_wheel_contains_every_source_module(installed_wheel: InstalledWheel) -> None:
    wheel = _wheel_modules(installed_wheel.wheel_members)
    expected = installed_wheel.source_modules
    assert wheel == expected, _diff(expected, wheel, "wheel modules differ from the source files")


@pytest.mark.slow
def test_wheel_has_one_top_level_package_with_py_typed_everywhere(
    installed_wheel: InstalledWheel,
) -> None:
    top_level = {m.split("/", 1)[0] for m in installed_wheel.wheel_members}
    packages = {t for t in top_level if not t.endswith(".dist-info")}
    assert packages == {DIST}, f"wheel top-level entries: {sorted(top_level)}"
    members = set(installed_wheel.wheel_members)
    untyped = [
        p
        for p in installed_wheel.listed_packages
        if p.replace(".", "/") + "/py.typed" not in members
    ]
    assert not untyped, f"packages without py.typed in the wheel: {untyped}"


@pytest.mark.slow
def test_installed_wheel_provides_every_module(installed_wheel: InstalledWheel) -> None:
    present = set(installed_wheel.imported) | set(installed_wheel.failed)
    expected = installed_wheel.source_modules
    assert present == expected, _diff(
        expected, present, "modules pkgutil finds in the installed wheel differ from the source"
    )


@pytest.mark.slow
def test_wheel_ships_the_web_ui_templates_and_static_files(installed_wheel: InstalledWheel) -> None:
    """Package data is not a module: a template or script left out of package-data would only
    show as a broken page."""
    ui = REPO / "engine" / "ui"
    expected = {
        f"{DIST}/engine/ui/{path.relative_to(ui).as_posix()}"
        for folder in ("templates", "static")
        for path in (ui / folder).iterdir()
    }
    assert expected, "no web UI files found on disk"
    missing = sorted(expected - set(installed_wheel.wheel_members))
    assert not missing, f"web UI files missing from the wheel: {missing}"


@pytest.mark.slow
def test_installed_wheel_imports_every_module(installed_wheel: InstalledWheel) -> None:
    failures = "\n".join(f"--- {name} ---\n{tb}" for name, tb in installed_wheel.failed.items())
    assert not installed_wheel.failed, f"modules that fail to import from the wheel:\n{failures}"
    outside = {
        name: path
        for name, path in installed_wheel.imported.items()
        if not Path(path).is_relative_to(installed_wheel.venv_prefix)
    }
    assert not outside, f"modules imported from outside the clean venv: {outside}"


@pytest.mark.slow
def test_installed_wheel_has_no_bare_folder_packages(installed_wheel: InstalledWheel) -> None:
    expected = {name: ("ModuleNotFoundError", name) for name in BARE_NAMES}
    assert installed_wheel.bare == expected


# --- 3. the development install --------------------------------------------------------------


_DEV_PROBE = textwrap.dedent(
    """
    import importlib, json, sys

    result = {}
    for name in json.loads(sys.argv[1]):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            result[name] = ["ModuleNotFoundError", exc.name]
        else:
            result[name] = ["imported", None]
        result["stepsource." + name] = [importlib.import_module("stepsource." + name).__name__]
    print(json.dumps(result))
    """
)


def test_dev_install_exposes_namespace_but_not_bare_folders(tmp_path: Path) -> None:
    """The repo venv's install is the strict editable one: no repo root on ``sys.path``."""
    proc = _run([sys.executable, "-I", "-c", _DEV_PROBE, json.dumps(list(BARE_NAMES))], tmp_path)
    result: dict[str, list[str | None]] = json.loads(proc.stdout.strip().splitlines()[-1])
    expected: dict[str, list[str | None]] = {}
    for name in BARE_NAMES:
        expected[name] = ["ModuleNotFoundError", name]
        expected["stepsource." + name] = ["stepsource." + name]
    assert result == expected


def test_python_m_stepsource_runs_from_the_repository_root() -> None:
    """In a fresh clone a user runs ``python -m stepsource`` at the root, where the folder
    ``stepsource/`` shadows the install: it still finds its subpackages, in the checkout."""
    proc = _run([sys.executable, "-m", "stepsource", "--help"], REPO)
    assert "usage: stepsource" in proc.stdout
    probe = "import stepsource, stepsource.engine.engine as e; print(e.__file__)"
    where = _run([sys.executable, "-c", probe], REPO).stdout.strip().splitlines()[-1]
    assert Path(where).resolve() == REPO / "engine" / "engine.py"
