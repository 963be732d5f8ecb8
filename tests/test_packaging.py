"""Packaging: the package builds into a wheel that installs and imports in a fresh environment.

The wheel is built from a copy of exactly the files a source distribution
ships (``pyproject.toml``, ``README.md``, ``LICENSE``, ``gpytorch_tp/``), with
the setuptools of the running environment (``--no-build-isolation``: no
network).  It is installed with ``--no-deps`` into a new virtual environment
whose only other packages are those of the running environment (torch,
gpytorch, ...), and imported there from a directory outside the checkout.
About 6 s of CPU time (three interpreter start-ups, one importing torch).
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import gpytorch_tp

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = (ROOT / "pyproject.toml").read_text()
# tomllib is Python >= 3.11; the two fields read here are plain one-line strings.
VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, re.MULTILINE).group(1)
LICENSE_FIELD = re.search(r"^license = (.+)$", PYPROJECT, re.MULTILINE).group(1)


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")}
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, check=False, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "gpytorch_tp", source / "gpytorch_tp", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
         + ["-w", dist, source])  # fmt: skip
    (path,) = dist.glob("gpytorch_tp-*.whl")
    return path


def test_wheel_contents(wheel):
    version = VERSION
    assert wheel.name.startswith(f"gpytorch_tp-{version}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gpytorch_tp/py.typed" in names
    assert "gpytorch_tp/kernels/mlp_kernel.py" in names and "gpytorch_tp/layers/base.py" in names
    assert any(n.endswith((".dist-info/licenses/LICENSE", ".dist-info/LICENSE")) for n in names)
    assert not any(n.startswith(("tests/", "benchmarks/", "tutorials/", "docs/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(f"gpytorch_tp-{version}.dist-info/METADATA").decode()
    assert f"Version: {version}" in metadata and "Requires-Dist: torch" in metadata


def test_wheel_installs_and_imports_in_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    # --system-site-packages alone would give the base interpreter's packages, not this
    # environment's (when it is itself a venv): point the new one at ours with a .pth file.
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    ours = sysconfig.get_paths()["purelib"]
    (purelib / "outer_environment.pth").write_text(ours + "\n")
    # pip of this environment, run by the new interpreter, installs into the new venv;
    # --ignore-installed: a gpytorch_tp installed here (editable, say) must not count.
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel])

    probe = (
        "import json, pathlib, torch, gpytorch_tp\n"
        "from gpytorch_tp import MLPKernel\n"
        "k = MLPKernel(depth=2, nonlinearity='erf').double()(torch.eye(3, dtype=torch.float64)).to_dense()\n"
        "root = pathlib.Path(gpytorch_tp.__file__).parent\n"
        "print(json.dumps({'file': str(root), 'version': gpytorch_tp.__version__,\n"
        "    'typed': (root / 'py.typed').is_file(), 'symmetric': bool((k == k.T).all()), 'shape': list(k.shape)}))\n"
    )
    out = json.loads(_run([python, "-c", probe], cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert Path(out["file"]).is_relative_to(purelib), out  # the installed copy, not the checkout
    assert out["version"] == VERSION == gpytorch_tp.__version__
    assert out["typed"] and out["symmetric"] and out["shape"] == [3, 3]


def test_license_and_changelog_match_the_metadata():
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License")
    # An SPDX expression: the TOML-table form is deprecated by setuptools.
    assert LICENSE_FIELD == '"MIT"', LICENSE_FIELD
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{gpytorch_tp.__version__}]" in changelog


def _public_callables():
    """(qualified name, function) for the functions and methods of everything in a public ``__all__``."""
    import gpytorch_tp.empirical
    import gpytorch_tp.kernels
    import gpytorch_tp.layers

    seen = set()
    for module in (gpytorch_tp, gpytorch_tp.kernels, gpytorch_tp.layers, gpytorch_tp.empirical):
        for name in module.__all__:
            obj = getattr(module, name)
            if id(obj) in seen or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            seen.add(id(obj))
            if inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj
                continue
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr not in ("__init__", "__call__"):
                    continue
                if isinstance(member, staticmethod | classmethod):
                    member = member.__func__
                if inspect.isfunction(member):
                    yield f"{obj.__module__}.{obj.__qualname__}.{attr}", member


def test_public_api_is_fully_type_annotated():
    missing = []
    for name, function in _public_callables():
        signature = inspect.signature(function)
        for parameter in signature.parameters.values():
            if parameter.name in ("self", "cls") or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            if parameter.annotation is inspect.Parameter.empty:
                missing.append(f"{name}({parameter.name})")
        if not name.endswith("__init__") and signature.return_annotation is inspect.Signature.empty:
            missing.append(f"{name} -> return")
    assert not missing, f"public functions without type hints: {missing}"


def _module_level_imports(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:  # module level only: imports inside functions are optional extras
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_imported_distribution_is_declared():
    from importlib.metadata import packages_distributions

    declared = {
        re.split(r"[<>=!~ ]", line.strip().strip('",'))[0].lower().replace("_", "-")
        for line in re.search(r"^dependencies = \[(.*?)\]", PYPROJECT, re.MULTILINE | re.DOTALL).group(1).splitlines()
        if line.strip().startswith('"')
    }
    distributions = packages_distributions()
    imported = set()
    for path in (ROOT / "gpytorch_tp").rglob("*.py"):
        imported |= _module_level_imports(path)
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "gpytorch_tp"}
    missing = {}
    for name in sorted(third_party):
        dists = {d.lower().replace("_", "-") for d in distributions.get(name, [name])}
        if not dists & declared:
            missing[name] = sorted(dists)
    assert not missing, f"imported at module level but not in pyproject's dependencies: {missing}"
