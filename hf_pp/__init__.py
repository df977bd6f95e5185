"""hf_pp: pipeline parallelism for the Hugging Face Trainer."""

from .errors import PipelineConfigError
from . import functional
from .autopipeline import AutoPipeline, PipelineInfo

__all__ = ["AutoPipeline", "PipelineInfo", "PipelineConfigError", "functional"]
__version__ = "0.1.0"
