"""LPIPS against the baseline video, when the ``lpips`` package and its backbone weights are local.

Nothing is downloaded: the backbone (torchvision's AlexNet by default) must already be in torch's
hub cache (``torch.hub.get_dir()/checkpoints``); otherwise the eval runs without LPIPS and
``run.json`` says why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

# torchvision's checkpoint file names of the LPIPS backbones
BACKBONES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth"}


def load_lpips(net: str = "alex"):
    """``(score, note)``: ``score(video, reference) -> float`` (mean LPIPS over frames, lower is
    closer) and a note for ``run.json``; ``score`` is None when LPIPS cannot run offline."""
    if net not in BACKBONES:
        raise ValueError(f"lpips net: expected one of {sorted(BACKBONES)}, got {net!r}")
    try:
        import lpips
    except ImportError:
        return None, ("not computed: the lpips package is not installed (pip install lpips, with its backbone "
                      "weights local)")
    ckpt = Path(torch.hub.get_dir()) / "checkpoints" / BACKBONES[net]
    if not ckpt.is_file():
        return None, f"not computed: the {net} backbone weights are not at {ckpt} (nothing is downloaded here)"
    model = lpips.LPIPS(net=net, verbose=False).eval()

    def score(video: np.ndarray, reference: np.ndarray) -> float:
        a, b = (torch.from_numpy(np.ascontiguousarray(x)).float().permute(0, 3, 1, 2) * 2 - 1
                for x in (video, reference))
        with torch.no_grad():
            return float(model(a, b).mean())

    return score, f"computed: lpips {getattr(lpips, '__version__', '')} net={net}".strip()
