#!/usr/bin/env bash
# peft's own tests (from peft's sdist, the version pinned in pyproject's dev extra) once against peft and once
# against deltatune through scripts/peft_suite/peft_shim.py; writes benchmarks/results/peft_suite.md.
# Slow (about 3 minutes a run on 2 cores); never part of `make test`. Needs PyPI for the sdist and diffusers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VERSION=$($PY -c "import importlib.metadata as m; print(m.version('peft'))")
WORK=.cache/peft_suite
mkdir -p "$WORK"
if [ ! -d "$WORK/peft-$VERSION/tests" ]; then
  $PY -m pip download -q --no-deps --no-binary :all: "peft==$VERSION" -d "$WORK"
  tar xzf "$WORK/peft-$VERSION.tar.gz" -C "$WORK"
  touch "$WORK/peft-$VERSION/tests/__init__.py"  # the sdist leaves it out; the files import each other relatively
fi
$PY -c "import diffusers" 2>/dev/null || $PY -m pip install -q diffusers  # peft's testing_common imports it
# PEFT_SUITE_TARGETS="deltatune" reruns one side, keeping the other's last log
FILES=${PEFT_SUITE_FILES:-"tests/test_custom_models.py tests/test_config.py"}
ROOT=$PWD
export HF_HUB_OFFLINE=1 PYTHONPATH="$ROOT/scripts/peft_suite"
for target in ${PEFT_SUITE_TARGETS:-peft deltatune}; do
  rm -f "$ROOT/$WORK/$target.jsonl"
  (cd "$WORK/peft-$VERSION" && $ROOT/$PY -m pytest -o addopts= -p no:cacheprovider -p peft_suite_plugin -q -n 2 \
    --peft-suite-target=$target --peft-suite-log="$ROOT/$WORK/$target.jsonl" $FILES > "$ROOT/$WORK/$target.out" 2>&1 || true)
  tail -1 "$WORK/$target.out"
done
$PY scripts/peft_suite/report.py "$WORK/peft.jsonl" "$WORK/deltatune.jsonl" benchmarks/results/peft_suite.md \
  --commit "$(git rev-parse --short HEAD)" \
  --versions "peft $VERSION, $($PY -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')"
