"""Make torchvision importable beside a CPU-only torch, before diffusers, transformers or spandrel
import it.

PyPI's torchvision wheels for Linux are built against CUDA torch. Beside the CPU build of torch
(what CI and GPU-less developers install, see requirements-diffusers.txt) their compiled ops
(`torchvision/_C.so`, which links libtorch_cuda) cannot load. torchvision tolerates that
(`extension._has_ops()` is False) except in `_meta_registrations.py`, which registers fake kernels
for `torchvision::nms` and `torchvision::qnms` unconditionally and so raises
"operator torchvision::nms does not exist" from `import torchvision`. Every library that looks
for torchvision then fails to import (transformers' lazy modules, diffusers' LoRA loaders, spandrel).

`ensure_torchvision_importable()` defines the schemas of those two operators (without kernels:
calling them still fails, as it would without the extension) and imports torchvision again, so its
pure-Python parts (transforms, which is all spandrel and transformers use) work. On a machine where
torchvision imports normally, or where it is not installed, it does nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import sys

log = logging.getLogger("kiln_worker.torch_compat")

# the operators torchvision's _meta_registrations registers without checking _has_ops(); the schemas
# are those of torchvision/csrc/ops/nms.cpp and quantized/cpu/qnms_kernel.cpp
_UNGUARDED_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # the torch.library.Library holding the schemas; kept alive for the process
_done = False


def ensure_torchvision_importable() -> None:
    """Import torchvision now, defining the operator schemas it needs when its ops cannot load."""
    global _done, _library
    if _done or importlib.util.find_spec("torchvision") is None:
        _done = True
        return
    try:
        import torchvision  # noqa: F401
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
        import torch

        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _library = torch.library.Library("torchvision", "DEF")  # noqa: TID251 (kept in a global on purpose)
        for schema in _UNGUARDED_OPS.values():
            _library.define(schema)
        import torchvision  # noqa: F401,F811

        log.info("torchvision %s has no compiled ops for this torch (%s); its Python parts are usable",
                 torchvision.__version__, torch.__version__)
    _done = True
