"""pytest plugin: a deprecation warning that a library raises because our code called a deprecated API is
blamed on our code, so that pyproject's `error::FutureWarning:model_server`-style filters fail the test.

Libraries point such warnings at the wrong frame for a module filter: transformers' renamed-argument
decorator names torch's `Module.__call__` (the frame that called the forward), its renamed methods their own
line. This re-issues a DeprecationWarning/FutureWarning with the stack level of the first frame outside the
warning library and torch's module dispatch, when that frame is in one of our packages. A deprecated call
that another library makes (peft reading transformers' `is_gradient_checkpointing`) keeps its attribution.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

OURS = tuple(str(Path(__file__).resolve().parents[1] / name) + "/" for name in ("service", "model_server", "loadtests"))
DISPATCH = ("torch.nn.modules.module",)  # frames between a caller and the forward it called
_warn = warnings.warn


def _package(frame) -> str:
    return frame.f_globals.get("__name__", "").partition(".")[0]


def _blaming_our_caller(message, category=None, stacklevel=1, source=None, **kwargs):  # kwargs: 3.12+
    kind = category if category is not None else getattr(message, "__class__", UserWarning)
    if isinstance(kind, type) and issubclass(kind, DeprecationWarning | FutureWarning):
        frame, level = sys._getframe(1), 2  # level 2: the caller of this function
        library = _package(frame)
        while frame is not None and (_package(frame) == library or frame.f_globals.get("__name__") in DISPATCH):
            frame, level = frame.f_back, level + 1
        if frame is not None and frame.f_code.co_filename.startswith(OURS) and level > stacklevel + 1:
            return _warn(message, category, stacklevel=level, source=source, **kwargs)
    return _warn(message, category, stacklevel=stacklevel + 1, source=source, **kwargs)


def pytest_configure(config) -> None:
    warnings.warn = _blaming_our_caller


def pytest_unconfigure(config) -> None:
    warnings.warn = _warn
