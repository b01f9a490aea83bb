"""Import autobahn's websocket code without the parts ticrypt never uses.

Every process that loads autobahn (the ``ticrypt`` CLI, ticrypt-vmc,
ticrypt-proxy, ticrypt-connect) paid two of autobahn's import-time costs
(``python -X importtime``, issues 7 and 8):

* ``autobahn.twisted``'s package ``__init__`` imports WAMP
  (``autobahn.twisted.wamp``) to re-export ``ApplicationSession``; ticrypt
  only uses ``autobahn.twisted.websocket``;
* the NVX wrappers (``autobahn.nvx._utf8validator``, ``._xormasker``) build a
  build-time ``cffi.FFI`` and parse its C declarations with pycparser at
  import (about 60 ms), although at run time they only call the compiled
  ``_nvx_utf8validator`` / ``_nvx_xormasker`` extension modules.

:func:`install` registers ``autobahn.twisted`` as a bare package (its
submodules import as before, its ``__init__`` does not run) and the two NVX
wrappers as small modules calling the same compiled extensions the same way.
The packages whose modules import autobahn run it first, in their
``__init__`` (:mod:`ticrypt.frontend`, :mod:`ticrypt.vmc`,
:mod:`ticrypt.proxy`, :mod:`ticrypt.connect`), so it happens before any of
their modules loads autobahn, in a daemon as in the CLI.  It does nothing
when autobahn's websocket code is already imported, when NVX is not built or
is disabled (``AUTOBAHN_USE_NVX=0``): then autobahn's own modules load as
usual.  Nothing imports ``autobahn.twisted``'s re-exports in ticrypt (a test
checks the lean masking and validation against RFC 6455).
"""

from __future__ import annotations

import os
import sys
import types
from importlib.machinery import PathFinder


def install() -> bool:
    """Register the lean modules; True if it did."""
    if "autobahn.twisted" in sys.modules or "autobahn.websocket" in sys.modules:
        return False
    if os.environ.get("AUTOBAHN_USE_NVX", "").strip().lower() in ("0", "no", "false"):
        return False
    try:
        import _nvx_utf8validator  # noqa: F401
        import _nvx_xormasker  # noqa: F401
    except ImportError:
        return False
    # PathFinder, not importlib.util.find_spec: this runs on every ``ticrypt``
    # start, ``--help`` included, which needs neither importlib.util nor typing
    spec = PathFinder.find_spec("autobahn")
    if spec is None or not spec.submodule_search_locations:
        return False
    root = list(spec.submodule_search_locations)[0]
    package = types.ModuleType("autobahn.twisted")
    package.__path__ = [os.path.join(root, "twisted")]
    package.__package__ = "autobahn.twisted"
    sys.modules["autobahn.twisted"] = package
    sys.modules["autobahn.nvx._utf8validator"] = _module("autobahn.nvx._utf8validator",
                                                         Utf8Validator=Utf8Validator)
    sys.modules["autobahn.nvx._xormasker"] = _module("autobahn.nvx._xormasker",
                                                     XorMaskerNvx=XorMaskerNvx,
                                                     create_xor_masker=create_xor_masker)
    return True


def _module(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


class Utf8Validator:
    """autobahn.nvx's ``Utf8Validator``, on the compiled ``_nvx_utf8validator``."""

    def __init__(self) -> None:
        from _nvx_utf8validator import ffi, lib
        self.ffi = ffi
        self.lib = lib
        self._vld = ffi.gc(lib.nvx_utf8vld_new(), lib.nvx_utf8vld_free)

    def reset(self) -> None:
        self.lib.nvx_utf8vld_reset(self._vld)

    def validate(self, ba: bytes) -> tuple[bool, bool, int, int]:
        res = self.lib.nvx_utf8vld_validate(self._vld, ba, len(ba))
        current_index = self.lib.nvx_utf8vld_get_current_index(self._vld)
        total_index = self.lib.nvx_utf8vld_get_total_index(self._vld)
        return (res >= 0, res == 0, current_index, total_index)


class XorMaskerNvx:
    """autobahn.nvx's XOR masker, on the compiled ``_nvx_xormasker``: scalar
    for payloads under 128 bytes, SSE2 from there (as autobahn chooses)."""

    __slots__ = ("ffi", "lib", "_masker", "_mask_buffer")

    def __init__(self, mask: bytes, use_simd: bool = True) -> None:
        assert len(mask) == 4, "Mask must be exactly 4 bytes"
        from _nvx_xormasker import ffi, lib
        self.ffi = ffi
        self.lib = lib
        self._mask_buffer = ffi.new("uint8_t[4]", mask)
        self._masker = ffi.gc(lib.nvx_xormask_new(self._mask_buffer), lib.nvx_xormask_free)
        lib.nvx_xormask_set_impl(self._masker, 2 if use_simd else 1)

    def pointer(self) -> int:
        return int(self.lib.nvx_xormask_pointer(self._masker))

    def reset(self) -> None:
        self.lib.nvx_xormask_reset(self._masker)

    def process(self, data: bytes) -> bytes:
        n = len(data)
        buf = self.ffi.new("uint8_t[]", n)
        self.ffi.memmove(buf, data, n)
        self.lib.nvx_xormask_process(self._masker, buf, n)
        return bytes(self.ffi.buffer(buf, n))


def create_xor_masker(mask: bytes, length: int | None = None) -> XorMaskerNvx:
    return XorMaskerNvx(mask, use_simd=not (length is None or length < 128))


__all__ = ["Utf8Validator", "XorMaskerNvx", "create_xor_masker", "install"]
