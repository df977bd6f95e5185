"""hf_pp: pipeline parallelism for the Hugging Face Trainer."""

from .errors import PipelineConfigError
from . import functional
from .autopipeline import AutoPipeline, PipelineInfo
from .trainer import PipelineTrainer
from .training_args import PipelineTrainingArguments

__all__ = ["AutoPipeline", "PipelineInfo", "PipelineConfigError", "PipelineTrainer", "PipelineTrainingArguments", "functional"]
__version__ = "0.1.0"
