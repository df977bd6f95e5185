"""hf_pp: pipeline parallelism for the Hugging Face Trainer."""

from .errors import PipelineConfigError
from . import functional

__all__ = ["PipelineConfigError", "functional"]
__version__ = "0.1.0"
