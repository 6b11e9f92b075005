"""Export steps for finalized models: ONNX (packed indices + LUTs rebuilt by ONNX ops, :mod:`.onnx`) and Core ML
(LUT metadata that coremltools turns into ``constexpr_lut_to_dense``, :mod:`.coreml`). The optional packages
(onnx, coremltools) are imported only when used."""
from __future__ import annotations

from .coreml import attach_metadata as attach_coreml_metadata
from .onnx import export_onnx

__all__ = ["attach_coreml_metadata", "export_onnx"]
