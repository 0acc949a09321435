"""Print the runtime dependencies of a pyproject.toml, one a line, leaving some out.

Used by the Dockerfile: the image keeps the base image's torch (and the triton it ships
with) and installs everything else the package needs, then the package with --no-deps.

    python pyproject_deps.py pyproject.toml --exclude torch triton > requirements.txt
"""

from __future__ import annotations

import argparse
import re
import sys


def _load(path: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as f:
        return tomllib.load(f)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    if not m:
        raise ValueError(f"cannot parse requirement {req!r}")
    return canonical(m.group(1))


def dependencies(path: str, exclude: list[str], extras: list[str]) -> list[str]:
    project = _load(path)["project"]
    deps = list(project.get("dependencies", []))
    for extra in extras:
        deps += project.get("optional-dependencies", {}).get(extra, [])
    skip = {canonical(x) for x in exclude}
    return [d for d in deps if requirement_name(d) not in skip]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pyproject")
    p.add_argument("--exclude", nargs="*", default=[], help="distribution names to leave out")
    p.add_argument("--extra", nargs="*", default=[], help="optional-dependency groups to add")
    a = p.parse_args(argv)
    for d in dependencies(a.pyproject, a.exclude, a.extra):
        print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
