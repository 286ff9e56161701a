"""Every exception that means "the input is wrong", not "dtypeforge has a bug", as one tuple."""
from __future__ import annotations

from dtypeforge.codegen.specs import UsageError
from dtypeforge.codegen.yamlsrc import SpecError
from dtypeforge.runtime.errors import UserError as RuntimeUserError

UserError = (SpecError, UsageError, *RuntimeUserError)
