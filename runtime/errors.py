"""The exceptions that mean "the user's input or machine is wrong", not "dtypeforge has a bug".

The CLI prints these as one line (exit code 1) instead of a traceback; anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

from dtypeforge.codegen.compile import CompileError, ToolchainError

from .binding import BindError
from .generate import ContextTooLong
from .target import LoadError


class BackendUnavailable(RuntimeError):
    """The asked-for backend cannot run here (no GPU, no PyCUDA, not enough device memory)."""


class KernelError(RuntimeError):
    """A CUDA error, attributed to the kernel that raised it."""


UserError = (LoadError, BindError, ContextTooLong, ToolchainError, CompileError, BackendUnavailable, KernelError)
