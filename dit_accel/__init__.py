"""dit-accel: faster, better-guided Diffusion Transformers for Hugging Face diffusers.

    import dit_accel
    handle = dit_accel.apply(pipe, attention=dit_accel.Dense())
    ...
    handle.remove()

or, per module, `pipe.transformer.set_attn_processor(dit_accel.AttnProcessor(dit_accel.Dense()))`.
"""

from .adapters import SUPPORTED_MODELS
from .apply import AccelHandle, apply
from .errors import MethodUnavailableError, UnsupportedModelError
from .geometry import attach, detach
from .guidance import SoftPAG
from .layout import AttentionCall, ModuleInfo, TokenLayout
from .methods import METHODS, AttentionMethod, Dense, Neighborhood, TemporalSparse
from .processor import AttnProcessor

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_MODELS", "METHODS", "AccelHandle", "AttentionCall", "AttentionMethod", "AttnProcessor", "Dense",
    "MethodUnavailableError", "ModuleInfo", "Neighborhood", "SoftPAG", "TemporalSparse", "TokenLayout",
    "UnsupportedModelError", "apply", "attach", "detach",
]
