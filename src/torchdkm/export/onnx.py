"""ONNX export that keeps the compression: packed uint8 indices and LUTs are the graph's initializers and the
weights are rebuilt inside the graph (unpack bits with integer ops, Gather from the LUT, Reshape).

How: a copy of the model is switched to compact mode (torchdkm.compact), whose weight rebuild is plain torch
ops, and traced by the TorchScript exporter (``dynamo=False``) with constant folding off, so the rebuild
stays in the graph instead of being folded back into dense float initializers.
"""
from __future__ import annotations

import copy
import io
import os
import warnings
from typing import Optional, Sequence

import torch
from torch import nn

from .._fileio import write_atomic
from ..compact import compact
from ..errors import ConfigError, MissingDependencyError
from ..parametrization import require_plain

MIN_OPSET = 18  # BitwiseAnd


def export_onnx(model: nn.Module, example_inputs, path, *, opset_version: int = MIN_OPSET,
                input_names: Optional[Sequence[str]] = None, output_names: Optional[Sequence[str]] = None,
                dynamic_axes: Optional[dict] = None) -> str:
    """Export a finalized ``model`` (dense or compact) to ONNX at ``path`` (written atomically); returns path.

    example_inputs: a tensor or a tuple of the forward's positional inputs. The model is not modified
    (a copy is exported, in eval mode). Example::

        torchdkm.export_onnx(model, torch.randn(1, 1, 28, 28), "model.onnx")
    """
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError("ONNX export needs the onnx package: pip install 'torchdkm[onnx]'") from None
    if opset_version < MIN_OPSET:
        raise ConfigError(f"export_onnx got opset_version={opset_version}: allowed is >= {MIN_OPSET}")
    require_plain(model, "torchdkm.export_onnx")
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    exported = compact(copy.deepcopy(model)).eval()
    buf = io.BytesIO()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        # The fused transformer fast path (aten::_transformer_encoder_layer_fwd) has no ONNX export.
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, fine here
            torch.onnx.export(exported, args, buf, dynamo=False, do_constant_folding=False,
                              opset_version=opset_version, input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    proto = onnx.load_from_string(buf.getvalue())
    shorten_names(proto.graph)
    write_atomic(path, lambda f: f.write(proto.SerializeToString()))
    return os.fspath(path)


def shorten_names(graph) -> None:
    """Rename nodes and intermediate values to short ids (in place). The exporter's names spell out each
    op's module path (~60 bytes, used ~3 times per node); with ~20 rebuild ops per layer they would add
    several KB per layer to a file whose point is to be small. Inputs, outputs, initializers keep theirs."""
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    renamed = {}
    for i, node in enumerate(graph.node):
        node.name = f"n{i}"
        node.doc_string = ""
        for j, name in enumerate(node.input):
            node.input[j] = renamed.get(name, name)
        for j, name in enumerate(node.output):
            if name and name not in keep:
                renamed[name] = node.output[j] = f"v{len(renamed)}"
    for v in graph.value_info:
        v.name = renamed.get(v.name, v.name)
