import logging
import os
import warnings

import torch

# Triton kernels run on CPU tensors under the interpreter; triton reads the switch when a kernel
# is decorated, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from diffusers.utils import logging as diffusers_logging

diffusers_logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
