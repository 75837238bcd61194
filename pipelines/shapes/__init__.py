"""ShapesBench: the embedded reference text-to-video DiT, its procedural data and trainer.

* ``data``: deterministic-from-seed samples (objects, colors, motions, backgrounds) and prompts;
* ``pipeline``: ``ShapesPipeline``, a diffusers pipeline over a pixel-space ``WanTransformer3DModel``;
* ``suite``: the held-out prompt suite (attribute combinations never seen in training);
* ``train``: the resumable GPU trainer (``python -m dit_accel.pipelines.shapes.train``).

Load the shipped weights with ``dit_accel.pipelines.load_reference()``.
"""

from .pipeline import (
    DEFAULT_SIZE,
    IMAGE_SIZE,
    SMALL_SIZE,
    ShapesPipeline,
    ShapesPipelineOutput,
)

__all__ = ["DEFAULT_SIZE", "IMAGE_SIZE", "SMALL_SIZE", "ShapesPipeline", "ShapesPipelineOutput"]
