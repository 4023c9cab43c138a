"""The foreign models every capability is tested on: Hugging Face Transformers models built
from the small configs in tests/models/configs (random init, no downloads), torch.nn.Transformer,
hand-written GPTs and a ResNet-style CNN (tests/models/foreign.py). Names are `zoo.build` names.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"
HF_MODELS = [
    f"hf:{path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}"
    for path in sorted(CONFIGS.glob("*.json"))
]
FOREIGN_MODELS = [
    f"{Path(__file__).parent / 'foreign.py'}:{name}"
    for name in ("transformer_seq2seq", "gpt_layernorm", "gpt_rmsnorm", "resnet")
]
ALL_MODELS = HF_MODELS + FOREIGN_MODELS


def short_name(model: str) -> str:
    """'hf:.../llama.json' -> 'llama'; '.../foreign.py:resnet' -> 'resnet'."""
    return Path(model[3:]).stem if model.startswith("hf:") else model.rpartition(":")[2]
