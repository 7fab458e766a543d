"""Deployment: ONNX export of OpenUS models and SegFormer students, an ONNX Runtime wrapper, int8 quantisation.

Needs the ``onnx`` extra (``pip install "openus_hub[onnx]"``: onnx and onnxruntime). Importing this package does
not import them; the functions that need them raise :class:`MissingExtraError` naming the extra.

```python
>>> from openus_hub.onnx import export_onnx, ORTModel
>>> export_onnx("path/to/openus-folder", "openus.onnx", dynamic_batch=True)
>>> model = ORTModel.from_pretrained("openus.onnx")   # config.json + preprocessor_config.json beside it
>>> model(pixel_values).pooler_output
```
"""

from __future__ import annotations

from ._deps import MissingExtraError
from .export import TASKS, ExportError, ExportResult, export_onnx
from .runtime import ORTModel

__all__ = ["TASKS", "ExportError", "ExportResult", "MissingExtraError", "ORTModel", "export_onnx"]
