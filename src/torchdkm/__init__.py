"""torchdkm: train-time weight clustering with a differentiable k-means layer (DKM)."""
from importlib.metadata import version as _version

from .api import finalize, initialize, prepare, start_from
from .compact import compact
from .config import DKMConfig
from .distill import distillation_loss
from .errors import ConfigError, FormatError, NonFiniteError, TorchDKMError
from .export import export_onnx
from .functional import dkm_cluster, dkm_cluster_reference, hard_cluster, nearest_centroid
from .kmeans import kmeans_init
from .planner import Plan, plan
from .ptq import palettize
from .report import LayerRow, Report, report
from .sensitivity import Sensitivity, fisher_diagonal
from .serialization import inspect_file, load, save
from .training import accumulate, recalibrate_batchnorm, soft_weights, step

__version__ = _version("torchdkm")

__all__ = [
    "DKMConfig",
    "ConfigError",
    "FormatError",
    "NonFiniteError",
    "TorchDKMError",
    "compact",
    "export_onnx",
    "inspect_file",
    "load",
    "save",
    "LayerRow",
    "Report",
    "distillation_loss",
    "accumulate",
    "recalibrate_batchnorm",
    "soft_weights",
    "step",
    "dkm_cluster",
    "dkm_cluster_reference",
    "finalize",
    "hard_cluster",
    "initialize",
    "kmeans_init",
    "nearest_centroid",
    "prepare",
    "start_from",
    "report",
    "Plan",
    "Sensitivity",
    "fisher_diagonal",
    "palettize",
    "plan",
    "__version__",
]
