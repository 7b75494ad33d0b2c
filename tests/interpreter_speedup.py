"""A test-only speed-up of Triton's CPU interpreter (loaded by tests/conftest.py).

Triton's interpreter swaps ``triton.language``'s builtins for interpreted ones when a kernel
launch starts (``GridExecutor.__call__`` → ``_patch_lang``) and restores them when it ends.
It also calls ``_patch_lang`` again at *every* call of a ``@triton.jit`` helper inside the
kernel — a scan of three modules with ``inspect.getmembers`` that finds everything already
patched.  In the kernels of this project (helpers called per hidden unit and per tile) that
scan was about 45 % of an emulated GPU launch's time (cProfile, Triton 3.9).

The wrapper below skips the nested scan when the helper sees only language modules the
running launch has already patched; the launch's own patch and restore are untouched.  It
installs only where the interpreter has the expected internals, and otherwise does nothing
(the tests then run at the interpreter's own speed).
"""
from __future__ import annotations


class _NoRestore:
    """The scope of a skipped nested patch: nothing to restore."""

    def restore(self) -> None:
        pass


def install() -> bool:
    """Wrap the interpreter's ``_patch_lang``; True when installed."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    original = getattr(interpreter, "_patch_lang", None)
    if original is None or getattr(original, "_mdm_fast", False):
        return False
    running: list[set[int]] = []   # language modules patched by the launch in progress

    def lang_ids(fn) -> set[int]:
        return {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}

    class _LaunchScope:
        """The launch's scope: restoring it also ends the launch."""

        def __init__(self, scope):
            self._scope = scope

        def restore(self) -> None:
            running.pop()
            self._scope.restore()

    def patch_lang(fn):
        langs = lang_ids(fn)
        if running:
            if langs <= running[-1]:
                return _NoRestore()
            running[-1] |= langs
            return original(fn)
        running.append(set(langs))
        return _LaunchScope(original(fn))

    patch_lang._mdm_fast = True
    interpreter._patch_lang = patch_lang
    return True
