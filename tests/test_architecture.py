"""The layout is the design (docs/architecture.md): one import package, and imports that only go down the layers.

The import rules are read from the source (every `import` and `from ... import` statement), so a new module
that reaches up a layer, or back into an adapter, fails here with the line that does it.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folder -> the layers its modules may import: its own and those below it ("pedseg" is the package root's own
# modules: the runner, the workspace, logging, evaluation).
LAYERS = {
    "pipeline": {"pipeline"},
    "synth": {"synth", "pipeline"},
    "reporting": {"reporting", "pipeline"},
    "tracking": {"tracking", "reporting", "pipeline"},
    "pedseg": {"pedseg", "tracking", "reporting", "pipeline"},
    "gear": {"gear", "pedseg", "tracking", "reporting", "pipeline"},
    "pacs": {"pacs", "pedseg", "tracking", "pipeline"},
    "batch": {"batch", "pedseg", "tracking", "reporting", "pipeline"},
    "cli": {"cli", "pacs", "batch", "synth", "pedseg", "tracking", "reporting", "pipeline"},
}
SUBPACKAGES = set(LAYERS) - {"pedseg"}


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import statement in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            found.append((node.lineno, node.module or "", [alias.name for alias in node.names]))
    return found


def layer(module: str) -> str | None:
    """The layer a pedseg module belongs to; None for a library."""
    parts = module.split(".")
    if parts[0] != "pedseg":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "pedseg"


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(LAYERS))
def test_each_layer_imports_only_itself_and_the_layers_below(folder):
    offending = [f"{path.relative_to(REPO)}:{line} imports {module}"
                 for path in python_files(folder) for line, module, _ in imports(path)
                 if layer(module) not in (None, *LAYERS[folder])]
    assert offending == []


def test_the_stages_import_no_adapter_reporting_or_tracking():
    """The rule the others rest on, spelled out: pipeline/ holds the stages and their types only."""
    assert LAYERS["pipeline"] == {"pipeline"}
    layers = {layer(module) for path in python_files("pipeline") for _, module, _ in imports(path)}
    assert layers <= {None, "pipeline"}


def test_nothing_imports_the_folders_as_top_level_packages_or_private_names():
    """Code, scripts, benchmarks and tests import pedseg.<folder>, never `pipeline` itself (which is no package
    outside the repository), and no module imports another's private name."""
    bare, private = [], []
    for path in python_files(*LAYERS, "scripts", "bench", "tests") + [REPO / "run.py"]:
        for line, module, names in imports(path):
            if module.split(".")[0] in SUBPACKAGES:
                bare.append(f"{path.relative_to(REPO)}:{line} imports {module}")
            if layer(module):
                private += [f"{path.relative_to(REPO)}:{line} imports {module}.{n}" for n in names if n.startswith("_")]
    assert bare == []
    assert private == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True)
    (path,) = out.glob("pedseg-*.whl")
    return path


def test_the_wheel_holds_only_the_pedseg_package_and_its_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"pedseg", wheel.name.split("-py3")[0] + ".dist-info"}
    for folder in SUBPACKAGES:
        assert f"pedseg/{folder}/__init__.py" in names, folder
    assert "pedseg/pipeline/bundle.schema.json" in names
    assert "pedseg/pipeline/data/atlas/t1_brats_space.nii.gz" in names
    assert "pedseg/pipeline/data/atlas/COPYRIGHT.md" in names  # the atlas' licence travels with it


def test_outside_the_repository_only_pedseg_imports_and_the_entry_points_run(tmp_path):
    def python(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)

    assert "No module named 'pipeline'" in python("import pipeline").stderr
    version = python("import pedseg; print(pedseg.__version__)")
    assert version.stdout.strip() == subprocess.run(
        [sys.executable, "-c", "from importlib.metadata import version; print(version('pedseg'))"],
        capture_output=True, text=True).stdout.strip()
    console = subprocess.run([Path(sys.executable).with_name("pedseg"), "--help"], cwd=tmp_path, capture_output=True,
                             text=True)
    assert console.returncode == 0
    assert "identify" in console.stdout
    gear = subprocess.run([sys.executable, str(REPO / "run.py"), "--help"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert gear.returncode == 0
    assert "--root" in gear.stdout


def test_the_manifest_version_is_the_package_version():
    import json

    import pedseg

    assert json.loads((REPO / "manifest.json").read_text())["version"] == pedseg.__version__
