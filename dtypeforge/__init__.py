"""dtypeforge: declarative dtype policies for LLM inference.

YAML specs (``dtypeforge/specs``: models, policies, devices) resolve to one Plan per target, which
renders both the CUDA kernels and the loader's packing table (``dtypeforge.codegen``); the runtime
(``dtypeforge.runtime``) packs a Hugging Face checkpoint by that table and runs the decoder on the
numpy reference backend or a GPU. The repository keeps codegen/, runtime/, specs/, templates/ and
generated/ at its top level; the build maps them into this package.
"""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dtypeforge")
except PackageNotFoundError:      # imported from a checkout that was never installed
    __version__ = "0+unknown"

# Run from a checkout without installing (PYTHONPATH=<repo>, as on a machine that cannot pip
# install), the subpackages are the repository's top-level folders beside this one, which the
# build maps into the package; an installed wheel has them inside it and never needs this.
_CHECKOUT = __import__("pathlib").Path(__file__).resolve().parent.parent
if not (_CHECKOUT / "dtypeforge" / "codegen").is_dir() and (_CHECKOUT / "codegen" / "__init__.py").is_file() \
        and (_CHECKOUT / "pyproject.toml").is_file():
    __path__.append(str(_CHECKOUT))

from .api import Engine, Sampling, load  # noqa: E402  (after __path__ is complete)
from .errors import UserError  # noqa: E402

__all__ = ["Engine", "Sampling", "UserError", "load", "__version__"]
