"""lensrun: run Microsoft's Lens text-to-image models fast, inside any VRAM budget, reproducibly."""

__version__ = "0.1.0"

from lensrun.errors import LensrunError  # noqa: E402
from lensrun.models.text_encoder import LensTextEncoder  # noqa: E402
from lensrun.models.transformer_lens import LensTransformer2DModel  # noqa: E402
from lensrun.pipeline import LensPipeline, LensPipelineOutput  # noqa: E402
from lensrun.api import generate, replay  # noqa: E402

__all__ = [
    "LensPipeline",
    "LensPipelineOutput",
    "LensTextEncoder",
    "LensTransformer2DModel",
    "LensrunError",
    "__version__",
    "generate",
    "replay",
]
