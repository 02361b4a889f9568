"""Package discovery for the one import root `squeezeflow` (see DESIGN.md).

The folders at the repository root are subpackages of `squeezeflow`; every folder
below them that holds an `__init__.py` is found here, so adding a step folder never
needs an edit to pyproject.toml.
"""

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
SUBPACKAGES = ("compression", "kernels", "evaluation", "registry", "tasks", "flows", "infra")


def discover() -> tuple[list[str], dict[str, str]]:
    packages, package_dir = ["squeezeflow"], {"squeezeflow": "squeezeflow"}
    for folder in SUBPACKAGES:
        package_dir[f"squeezeflow.{folder}"] = folder
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT)
            packages.append("squeezeflow." + ".".join(relative.parts))
    return packages, package_dir


packages, package_dir = discover()
setup(packages=packages, package_dir=package_dir)
