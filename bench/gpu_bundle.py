"""What the GPU run needs beside a lent machine's own Python, gathered here for a machine with no network.

A lent GPU machine has Python with a CUDA build of torch, triton, numpy and the scientific stack, but no
DeepSpeed, MLflow or datasets, and its transformers and huggingface-hub are other versions than the lock's;
nothing can be installed there from an index. This gathers, on a machine with PyPI, the wheels of every
distribution the suite imports (the lock's versions, built for the GPU machine's Python) except those the
machine brings (`FROM_IMAGE`: torch with its CUDA stack and the compiled libraries built against it), the
GSM8K test set the eval part reads, and a manifest. `bench/gpu_run.sh` installs them there and runs the suite.

    .venv/bin/python bench/gpu_bundle.py [--python-version 3.12] [--out .gpu-run]

Prints the manifest as JSON; exits 1 when a wheel cannot be had or the bundle outgrows `--max-mib` (what a
lent machine's working tree may carry, with the repository).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "tools"))
import lockfile  # noqa: E402

# The GPU machine's own: torch's CUDA build and what it installs with it, and the compiled libraries its image
# builds against them. Their versions there are the machine's (bench/gpu_run.sh prints them).
FROM_IMAGE = ("torch", "triton", "numpy", "scipy", "pandas", "pyarrow", "pillow", "sympy", "mpmath", "networkx",
              "setuptools")
FROM_IMAGE_PREFIXES = ("nvidia-", "cuda-")
# Imported here only because they are installed here: accelerate loads boto3 (SageMaker's configuration) where it
# finds it. 17 MiB that the suite never uses.
NOT_USED = ("boto3", "botocore", "s3transfer", "jmespath")
# Where pip may find a wheel built for the GPU machine (an x86-64 Linux of glibc 2.28 or later, its CPython).
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
GSM8K = Path("dataset", "gsm8k", "test.json")

_IMPORTED = """
import importlib, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import gpu_suite
for name in gpu_suite.PRELOAD:
    importlib.import_module(name)
print(json.dumps(sorted({m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)})))
"""


def imported_files() -> list[str]:
    """Every module file the suite's fork server preloads, in a fresh interpreter: what the units import later
    comes from these or from the machine's torch (a --tiny run over this bundle beside another Python's own
    packages found nothing missing)."""
    out = subprocess.run([sys.executable, "-c", _IMPORTED, str(BENCH), str(REPO)], capture_output=True, text=True,
                         check=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    return json.loads(out.stdout.splitlines()[-1])


def from_image(dist: str) -> bool:
    return canonicalize_name(dist) in FROM_IMAGE or canonicalize_name(dist).startswith(FROM_IMAGE_PREFIXES)


def owners(files: list[str]) -> dict[str, str]:
    """{distribution: its installed version} owning `files` (the standard library's and this repository's have
    none); a file several distributions install (mlflow's skinny, tracing and full packages) counts for the one of
    fewest files, the least to carry."""
    wanted = set(map(os.path.realpath, files))
    candidates: dict[str, list[tuple[int, str, str]]] = {}  # path: [(files, name, version)]
    for dist in md.distributions():
        root, recorded = os.path.realpath(str(dist.locate_file(""))), dist.files or []
        entry = (len(recorded), dist.metadata["Name"], dist.version)
        for f in recorded:
            path = os.path.normpath(os.path.join(root, str(f)))
            if path in wanted:
                candidates.setdefault(path, []).append(entry)
    chosen: dict[str, str] = {}
    for dists in candidates.values():
        _, name, version = min(dists)
        if name != "adaptune":  # this repository's own (it travels as it is)
            chosen[name] = version
    return dict(sorted(chosen.items(), key=lambda kv: kv[0].lower()))


def locked() -> dict[str, str]:
    """{canonical name: version} of requirements.lock."""
    return {canonicalize_name(name): version for name, version in lockfile.pins(lockfile.LOCK).items()}


def needed(dists: dict[str, str], lock: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """({distribution: the lock's version} to carry, the names the machine's image brings) of `dists`,
    the installed versions here; one that is not the lock's (a venv made otherwise than `make venv`) fails."""
    carry = {d: v for d, v in dists.items() if not from_image(d) and canonicalize_name(d) not in NOT_USED}
    off = {d: (v, lock.get(canonicalize_name(d))) for d, v in carry.items() if lock.get(canonicalize_name(d)) != v}
    if off:
        raise SystemExit("error: installed here at other versions than requirements.lock's (make venv): "
                         + ", ".join(f"{d} {have} (lock: {want})" for d, (have, want) in off.items()))
    return carry, sorted(d for d in dists if from_image(d))


def fetch(dist: str, version: str, python_version: str, into: Path) -> Path:
    """The wheel of `dist==version` for the GPU machine: PyPI's, or, where PyPI has only a source archive
    (DeepSpeed), one built here, which must then be pure Python."""
    before = set(into.iterdir())
    spec = f"{dist}=={version}"
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                          "--python-version", python_version, "--implementation", "cp", *platforms, "-d", str(into),
                          spec], capture_output=True, text=True)
    if got.returncode != 0:
        with tempfile.TemporaryDirectory() as tmp:
            built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                                    "-w", tmp, spec], capture_output=True, text=True,
                                   env={**os.environ, "DS_BUILD_OPS": "0"})
            wheels = list(Path(tmp).glob("*.whl"))
            if built.returncode != 0 or len(wheels) != 1 or not wheels[0].name.endswith("-py3-none-any.whl"):
                raise SystemExit(f"error: no wheel of {spec} for CPython {python_version}: "
                                 f"{(got.stderr or built.stderr).strip().splitlines()[-1:]}")
            shutil.move(wheels[0], into / wheels[0].name)
    new = set(into.iterdir()) - before
    if len(new) != 1:
        raise SystemExit(f"error: {spec}: expected one wheel, got {sorted(p.name for p in new)}")
    return new.pop()


def image_requirements(wheels: list[Path], python_version: str) -> dict[str, list[tuple[str, str]]]:
    """{a distribution of the machine's image: [(version specifier, the carried distribution that asks it)]}:
    what `bench/gpu_run.sh` checks against the versions that machine has before it runs anything."""
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0",
           "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
    needs: dict[str, list[tuple[str, str]]] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode().splitlines()
        by = wheel.name.split("-")[0]
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.removeprefix("Requires-Dist:").strip())
            if from_image(req.name) and (req.marker is None or req.marker.evaluate(env)):
                needs.setdefault(canonicalize_name(req.name), []).append((str(req.specifier), by))
    return dict(sorted(needs.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's CPython (a lent H200's: 3.12)")
    parser.add_argument("--out", default=str(REPO / ".gpu-run"))
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "llm-adapters"),
                        help="where dataset/gsm8k/test.json is (the paper repository's layout)")
    parser.add_argument("--max-mib", type=float, default=48.0)
    args = parser.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    carry, image = needed(owners(imported_files()), locked())
    manifest = {"python_version": args.python_version, "carried": carry, "from_image": image,
                "wheels": {}}
    for dist, version in carry.items():
        wheel = fetch(dist, version, args.python_version, wheels)
        manifest["wheels"][wheel.name] = wheel.stat().st_size
    manifest["image_requirements"] = image_requirements(sorted(wheels.iterdir()), args.python_version)
    gsm8k = Path(args.data_root) / GSM8K
    if gsm8k.is_file():
        (out / "data" / GSM8K).parent.mkdir(parents=True)
        shutil.copy(gsm8k, out / "data" / GSM8K)
    manifest["gsm8k"] = gsm8k.is_file()
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    manifest["mib"] = round(size / 2**20, 1)
    (out / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))
    if manifest["mib"] > args.max_mib:
        raise SystemExit(f"error: the bundle is {manifest['mib']} MiB, over --max-mib {args.max_mib}")


if __name__ == "__main__":
    main()
