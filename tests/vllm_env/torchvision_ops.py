"""Test environment only (scripts/dev.sh test-vllm puts a .pth file in its venv that imports this module).

vLLM's LLaVA imports torchvision. PyPI's torchvision is built against PyPI's CUDA torch: beside a CPU build of torch
its compiled operators do not load, and ``import torchvision`` then fails where it registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms``. Declaring those two schemas (with no kernels) before torchvision is
imported lets the pure-Python part of torchvision (the image transforms vLLM and transformers use) import; calling
either operator still fails. Nothing in prunekit imports this module.
"""

from __future__ import annotations

import importlib.abc
import sys

_SCHEMAS = ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_library = None


def declare() -> None:
    """Declare the schemas once, unless torchvision's own operators loaded."""
    global _library
    import torch

    if _library is not None or hasattr(torch.ops.torchvision, "nms"):
        return
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _library.define(schema)


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Declares the schemas the first time ``torchvision`` is imported (so interpreters that never import it do
    not pay for importing torch)."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            declare()
        return None


def install() -> None:
    if not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())
