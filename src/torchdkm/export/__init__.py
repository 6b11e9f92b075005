"""Exporters of finalized models: ONNX (packed indices + LUTs rebuilt by ONNX ops) and Core ML (LUT metadata
that coremltools turns into ``constexpr_lut_to_dense``). onnx / coremltools are imported only when used."""
from __future__ import annotations


def export_onnx(model, example_inputs, path, **kwargs):
    """See :func:`torchdkm.export.onnx.export_onnx`."""
    from .onnx import export_onnx as _export

    return _export(model, example_inputs, path, **kwargs)


def attach_coreml_metadata(model):
    """See :func:`torchdkm.export.coreml.attach_coreml_metadata`."""
    from .coreml import attach_coreml_metadata as _attach

    return _attach(model)


__all__ = ["attach_coreml_metadata", "export_onnx"]
