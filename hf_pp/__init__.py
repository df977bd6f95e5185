"""hf_pp: pipeline parallelism for the Hugging Face Trainer.

Swap ``Trainer`` for :class:`PipelineTrainer` and ``TrainingArguments`` for
:class:`PipelineTrainingArguments`, then launch one process per pipeline rank
with ``torchrun``. :class:`AutoPipeline` and :mod:`hf_pp.functional` split a
model without the Trainer. A setting that cannot work raises
:class:`PipelineConfigError` on every rank, before any communication.

Example (no process group needed to build the arguments):
    >>> import hf_pp
    >>> args = hf_pp.PipelineTrainingArguments(output_dir="out", pp_size=2, pp_schedule="interleaved_1f1b",
    ...                                        per_device_train_batch_size=8, report_to="none")
    >>> args.pp_num_microbatches  # the batch of 8 runs as 8 microbatches of pp_microbatch_size=1
    8
    >>> try:
    ...     hf_pp.PipelineTrainingArguments(output_dir="out", pp_size=0, report_to="none")
    ... except hf_pp.PipelineConfigError as err:
    ...     print(err)
    pp_size must be at least 1, got 0.
"""

from .errors import PipelineConfigError
from . import functional
from .autopipeline import AutoPipeline, PipelineInfo
from .trainer import PipelineMixin, PipelineTrainer
from .training_args import PipelineArguments, PipelineTrainingArguments

__all__ = [
    "AutoPipeline", "PipelineInfo", "PipelineConfigError", "PipelineMixin", "PipelineTrainer", "PipelineArguments",
    "PipelineTrainingArguments", "PipelineSFTTrainer", "PipelineSFTConfig", "functional",
]


def __getattr__(name: str):
    # TRL is optional: hf_pp imports without it, and the SFT classes load (or explain) on first use.
    if name in ("PipelineSFTTrainer", "PipelineSFTConfig"):
        from . import sft_trainer

        return getattr(sft_trainer, name)
    raise AttributeError(f"module 'hf_pp' has no attribute {name!r}")
__version__ = "0.1.0"
