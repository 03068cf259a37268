"""The lock file `requirements.lock`: is it current, and what a CPU install takes from it.

The lock is made by `make lock` (uv pip compile, universal: every platform, Python >= 3.11) and
stamped with two digests: of pyproject.toml's dependency inputs and of the lock's own body. An edit
of either file without `make lock` breaks a digest, so an install refuses it in one line before it
touches anything. Standard library only: it runs before the virtual environment exists.

    python3 tools/lockfile.py check            exit 2 with one line when the lock is stale or edited
    python3 tools/lockfile.py stamp FILE       prepend the header with both digests to a fresh lock
    python3 tools/lockfile.py cpu [LOCK]       the lock without torch and its CUDA runtime wheels
    python3 tools/lockfile.py pin NAME [LOCK]  the locked version of NAME
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
PYPROJECT = REPO / "pyproject.toml"
# A CPU install takes torch from the Makefile's TORCH_SPEC (or keeps the machine's own build) and
# none of the CUDA runtime that PyPI's Linux torch wheels pull in.
ACCELERATOR = re.compile(r"^(torch|triton|nvidia-(?!ml-py)[a-z0-9-]+|cuda-[a-z0-9-]+)==")
HEADER = """\
# Every package adaptune installs, at the versions its test suite passed with. Do not edit: `make lock`
# re-resolves it from pyproject.toml (all extras; universal: Linux, macOS, Windows, Python >= 3.11),
# keeping each pin that still fits; `make lock UPGRADE="transformers peft"` (or UPGRADE=all) moves pins.
# make demo / make test / .ci/run install it without torch's CUDA wheels (torch: the Makefile's TORCH_SPEC);
# docker/Dockerfile installs all of it.
"""


def inputs_digest() -> str:
    """sha256 of what the resolution depends on in pyproject.toml: Python range, deps, extras."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    inputs = {
        "requires-python": project["requires-python"],
        "dependencies": project["dependencies"],
        "optional-dependencies": project.get("optional-dependencies", {}),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def split(text: str) -> tuple[dict[str, str], str]:
    """The stamped digests of a lock and its body (everything after the header)."""
    lines = text.splitlines(keepends=True)
    stamps, start = {}, 0
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            start = i
            break
        if m := re.match(r"# (pyproject|lock)-sha256: ([0-9a-f]{64})$", line.strip()):
            stamps[m.group(1)] = m.group(2)
    return stamps, "".join(lines[start:])


def check() -> int:
    if not LOCK.exists():
        return fail(f"{LOCK.name} is missing: run `make lock`")
    stamps, body = split(LOCK.read_text())
    if stamps.get("pyproject") != inputs_digest():
        return fail(f"{LOCK.name} does not match pyproject.toml's dependencies: run `make lock`")
    if stamps.get("lock") != hashlib.sha256(body.encode()).hexdigest():
        return fail(f"{LOCK.name} was edited by hand: run `make lock` (git checkout {LOCK.name} to undo)")
    return 0


def stamp(fresh: Path) -> int:
    body = "".join(line for line in fresh.read_text().splitlines(keepends=True) if not line.startswith("#"))
    digests = f"# pyproject-sha256: {inputs_digest()}\n# lock-sha256: {hashlib.sha256(body.encode()).hexdigest()}\n"
    LOCK.write_text(HEADER + digests + body)
    return 0


def requirements(lock: Path) -> list[str]:
    return [line for line in split(lock.read_text())[1].splitlines() if line and not line.startswith((" ", "#"))]


def cpu(lock: str = str(LOCK)) -> int:
    print("\n".join(line for line in requirements(Path(lock)) if not ACCELERATOR.match(line)))
    return 0


def pins(lock: Path) -> dict[str, str]:
    """{name as the lock spells it: its version}."""
    return dict(line.split(";")[0].strip().split("==", 1) for line in requirements(lock))


def pin(name: str, lock: str = str(LOCK)) -> int:
    if name not in (locked := pins(Path(lock))):
        return fail(f"{name} is not in {lock}")
    print(locked[name])
    return 0


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    commands = {"check": check, "stamp": lambda f: stamp(Path(f)), "cpu": cpu, "pin": pin}
    if not argv or argv[0] not in commands:
        return fail(f"usage: tools/lockfile.py {{{','.join(commands)}}} [ARG]")
    return commands[argv[0]](*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
