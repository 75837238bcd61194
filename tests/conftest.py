import logging
import warnings

from diffusers.utils import logging as diffusers_logging

diffusers_logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*should be kept in float32.*")
