"""Our top-level packages own their names: no other installed distribution ships a package of the same name.

Two distributions with one top-level name overwrite each other's files when installed together, and which
one `import` finds then depends on sys.path (transformers 5.25 requires Hugging Face's `kernels`, which is
why our kernels live in `tokenq_kernels`)."""

import importlib.metadata
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def our_top_level_packages() -> list[str]:
    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    names = [pattern.rstrip("*") for pattern in found["include"]]
    assert all((ROOT / name / "__init__.py").is_file() for name in names), names
    return names


def test_no_other_distribution_ships_our_package_names():
    owners = importlib.metadata.packages_distributions()
    shared = {name: others for name in our_top_level_packages() if (others := set(owners.get(name, [])) - {"tokenq"})}
    assert shared == {}, f"top-level package names also shipped by other distributions: {shared}"


def test_our_packages_import_from_this_repository():
    for name in our_top_level_packages():
        module = __import__(name)
        assert Path(module.__file__).resolve().is_relative_to(ROOT), (name, module.__file__)
