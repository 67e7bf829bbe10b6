# Type stub for the cffi-generated extension (see _build.py): cffi objects are untyped, so the
# typed surface lives in the wrapper modules instead.
from typing import Any

ffi: Any
lib: Any
