# Sourced by the tools/gpu_*.sh scripts on the GPU machine: PyCUDA from the repo's .whl/ (git-ignored;
# tests/conftest.py also needs the gguf and tqdm wheels there:
# `pip download --no-deps gguf tqdm -d .whl`), the environment the runtime needs, `cg` (the codegen CLI of the current
# directory's tree) and `synth SHAPE...` (synthetic models of real shapes, made once, in $M).
OUT=${OUT:-/tmp/dtypeforge-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site "$(dirname "${BASH_SOURCE[0]}")"/../.whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PATH=/usr/local/cuda/bin:$PATH DTYPEFORGE_CACHE=/tmp/dtypeforge-cache
cg() { python3 -c 'import sys; from dtypeforge.cli import main; sys.exit(main())' "$@"; }
M=/tmp/models; mkdir -p $M
synth() { for s in "$@"; do [[ -f $M/$s/config.json ]] || cg synth-model --shape "$s" --out "$M/$s" >/dev/null; done; }
