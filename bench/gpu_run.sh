#!/usr/bin/env bash
# The prepared GPU run on a lent machine that reaches no network, whose python3 holds a CUDA build of torch:
#
#   here (with PyPI):  .venv/bin/python bench/gpu_bundle.py     # the wheels and the data it needs: .gpu-run/
#   there:             bash bench/gpu_run.sh                     # .gpu-run/ carried beside the working tree
#
# Installs the bundle over that Python (into $SITE, first on PYTHONPATH, so the lock's versions win over the
# machine's), then runs bench/gpu_suite.py with any arguments given here. Its JSON (gpu-<gpu>.json) and the log of
# it all (gpu-run.log) go to $OUT (the device tool's folder, which brings back few files: the units' own JSON stay
# in $WORK), else to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
bundle=${BUNDLE:-.gpu-run}
out=${OUT:-bench/results}
site=${SITE:-/tmp/adaptune-site}
work=${WORK:-/tmp/adaptune-gpu-run}

if [ ! -f "$bundle/bundle.json" ]; then
    echo "error: $bundle/bundle.json: no bundle here (make gpu-bundle where PyPI is reachable, then carry $bundle)" >&2
    exit 2
fi
want=$($python -c 'import json, sys; print(json.load(open(sys.argv[1]))["python_version"])' "$bundle/bundle.json")
have=$($python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$want" != "$have" ]; then
    echo "error: $bundle/bundle.json: python_version: built for $want; $python is $have (bench/gpu_bundle.py" \
         "--python-version $have)" >&2
    exit 2
fi

run() {
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$bundle"/wheels/*.whl
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    # What the carried packages ask of the machine's own (torch, numpy, pyarrow ...): said before anything runs.
    $python - "$bundle/bundle.json" <<'PY'
import importlib.metadata, json, sys
from packaging.specifiers import SpecifierSet
for name, needs in json.load(open(sys.argv[1]))["image_requirements"].items():
    try:
        have = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        have = None
    for spec, by in needs:
        if have is None or not SpecifierSet(spec).contains(have, prereleases=True):
            print(f"warning: {by} needs {name}{spec}; this machine has {have or 'none'}", file=sys.stderr)
    print(f"from this machine: {name} {have}")
PY
    if [ -f "$bundle/data/dataset/gsm8k/test.json" ]; then
        export ADAPTUNE_DATA=$PWD/$bundle/data
    fi
    name=$($python -c 'import torch; print(torch.cuda.get_device_name(0).split()[-1].lower()
                                           if torch.cuda.is_available() else "cpu")')
    $python bench/gpu_suite.py --out "$out/gpu-$name.json" --units "$work/units" "$@"
}

mkdir -p "$out" "$work"
run "$@" 2>&1 | tee "$out/gpu-run.log"  # all of it, the machine's versions first
