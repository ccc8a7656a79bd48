"""Let mmsegmentation import on top of ``mmcv-lite``, which ships no compiled ops.

mmseg 1.2.2 imports a few names from ``mmcv.ops`` at module level. ``mmcv-lite`` has the Python
sources of ``mmcv.ops`` but not the ``mmcv._ext`` extension they load, so ``import mmcv.ops`` fails
and takes ``mmseg.models`` down with it. Only ``point_sample`` is needed on the paths we use, and it
is plain torch code, so we load that one file on its own and stand in for the rest with functions
that fail loudly when called. See the design notes, dependencies.md §3A.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

# Names mmseg imports from mmcv.ops besides point_sample; all need the compiled extension.
_COMPILED_ONLY = ("sigmoid_focal_loss", "CrissCrossAttention", "PSAMask", "DeformConv2d", "ModulatedDeformConv2d")
_SHIM_FLAG = "__glare_shim__"


def _needs_compiled_mmcv(name: str):
    """A callable that raises a clear error in place of a compiled mmcv op."""

    def unavailable(*args, **kwargs):
        raise NotImplementedError(
            f"mmcv.ops.{name} needs the compiled mmcv build; mmcv-lite only provides a shim "
            "(see dependencies.md §3B to build full mmcv)"
        )

    unavailable.__name__ = name
    return unavailable


def install_mmcv_ops_shim() -> bool:
    """Make ``mmcv.ops`` importable without compiled ops; call before ``import mmseg.models``.

    Returns:
        True when the shim is in place (installed now or earlier), False when the real compiled
        ``mmcv.ops`` imports and nothing was changed.

    Raises:
        ImportError: mmcv (or mmcv-lite) itself is not installed.
    """
    try:
        import mmcv.ops as ops
    except (ImportError, OSError):  # mmcv-lite: `No module named 'mmcv._ext'`; a broken build: OSError
        ops = None
    if ops is not None:
        return bool(getattr(ops, _SHIM_FLAG, False))

    import mmcv

    # A failed import can leave half-initialised submodules behind; drop them so ours is the only one.
    for key in [k for k in sys.modules if k == "mmcv.ops" or k.startswith("mmcv.ops.")]:
        del sys.modules[key]

    source = Path(mmcv.__file__).parent / "ops" / "point_sample.py"
    spec = importlib.util.spec_from_file_location("mmcv.ops.point_sample", source)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {source}; is this an mmcv-lite install?")
    point_sample_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(point_sample_module)

    shim = types.ModuleType("mmcv.ops", "Pure-Python stand-in for mmcv.ops (glare.eval.mmseg_shim).")
    shim.__path__ = []  # a package, so `import mmcv.ops.point_sample` resolves through sys.modules
    setattr(shim, _SHIM_FLAG, True)
    shim.point_sample = point_sample_module.point_sample
    for name in _COMPILED_ONLY:
        setattr(shim, name, _needs_compiled_mmcv(name))

    sys.modules["mmcv.ops"] = shim
    sys.modules["mmcv.ops.point_sample"] = point_sample_module
    mmcv.ops = shim
    return True
