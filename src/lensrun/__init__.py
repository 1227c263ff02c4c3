"""lensrun: run Microsoft's Lens text-to-image models fast, inside any VRAM budget, reproducibly.

Names are imported on first use, so `lensrun --help` and `lensrun plan` start without loading the model code.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "LensPipeline": "lensrun.pipeline",
    "LensPipelineOutput": "lensrun.pipeline",
    "LensTextEncoder": "lensrun.models.text_encoder",
    "LensTransformer2DModel": "lensrun.models.transformer_lens",
    "LensrunError": "lensrun.errors",
    "generate": "lensrun.api",
    "replay": "lensrun.api",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lensrun' has no attribute {name!r}")
