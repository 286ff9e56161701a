#!/usr/bin/env bash
# Make a tree for tools/gpu_ab.sh (OLD=.ab/NAME): the files of a git ref under .ab/NAME, with
# generated/ rebuilt by that tree's own codegen. (The repo's .venv/bin/codegen is an editable install
# of the checkout, so run inside .ab/NAME it would render the checkout's templates, not the tree's.)
# .ab/ is untracked and not ignored, so the device tool carries it; remove it before committing.
#   usage: tools/ab_tree.sh NAME [REF]     new tree from REF (default HEAD)
#          tools/ab_tree.sh NAME --build   rebuild generated/ after editing the tree's templates/specs
#   AB_DIR (default .ab) holds the trees; PYTHON (default .venv/bin/python) runs their codegen.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
name=${1:?usage: tools/ab_tree.sh NAME [REF|--build]}; ref=${2:-HEAD}
ab=${AB_DIR:-$root/.ab}; python=${PYTHON:-$root/.venv/bin/python}
tree=$ab/$name
if [[ $ref != --build ]]; then
  git -C "$root" rev-parse --verify -q "$ref^{commit}" >/dev/null || { echo "ab_tree: no commit '$ref'" >&2; exit 2; }
  rm -rf "$tree" && mkdir -p "$tree"
  git -C "$root" archive "$ref" | tar -x -C "$tree"
fi
[[ -d $tree/codegen ]] || { echo "ab_tree: $tree is not a tree (make it first: tools/ab_tree.sh $name REF)" >&2; exit 2; }
cd "$tree"
# The venv's editable install maps dtypeforge.* to the checkout; drop its finder so the tree's own
# files (found through PYTHONPATH and dtypeforge/__init__.py) render.
PYTHONPATH=$tree "$python" -c 'import sys; sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
from dtypeforge.cli import main; sys.exit(main())' build | tail -1
