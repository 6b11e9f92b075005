"""torchdkm: train-time weight clustering with a differentiable k-means layer (DKM)."""
from .api import finalize, initialize, prepare
from .compact_mode import compact
from .config import DKMConfig
from .errors import ConfigError, FormatError, TorchDKMError
from .functional import dkm_cluster, dkm_cluster_reference, hard_cluster, nearest_centroid
from .kmeans import kmeans_init
from .report import LayerRow, Report, report
from .serialization import load, save
from .export import export_onnx

__version__ = "0.1.0"

__all__ = [
    "DKMConfig",
    "ConfigError",
    "FormatError",
    "TorchDKMError",
    "compact",
    "export_onnx",
    "load",
    "save",
    "LayerRow",
    "Report",
    "dkm_cluster",
    "dkm_cluster_reference",
    "finalize",
    "hard_cluster",
    "initialize",
    "kmeans_init",
    "nearest_centroid",
    "prepare",
    "report",
    "__version__",
]
