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

Module map. Four layers; a module imports only from its own layer and the layers below it
(``tests/test_layers.py`` checks every import, module-level and inside functions, against this map):

pipeline: torch only (no transformers, peft or trl), usable on any nn.Module
    errors                    PipelineConfigError, the one exception for a misconfiguration
    deprecation               old names kept for one release, each warning once with its replacement
    stage_math                pure layout arithmetic: stages per rank, virtual stages, module FQNs per stage
    schedules                 choose, check and build a torch schedule (or a CSV one); stages: input grads first
    split                     cut a model into stage modules that keep their original FQNs
    layout                    facts of a whole layout in one process: parameters, bytes, expected bubble
    grads                     gradient scaling and the norm / clipping over all stages
    mesh                      the pp x dp device mesh from the world size, and this process's device
    reliability               ranks agree on the configuration, fail together, name the failed rank
    parallelize               data parallelism inside a stage as parallelize_fn hooks (DDP, FSDP2)
    evaluation                forward-only schedules, and outputs shared over the pipeline / gathered over DP
    losses                    loss functions the last stage runs per microbatch
    compile                   torch.compile of each decoder layer of every stage, in place
    tied                      tied weights across stages: the copies' gradients summed every step
    visualize                 pictures of schedules from their op lists (matplotlib)
models: what hf_pp knows of Hugging Face models, checkpoints and PEFT; the functional API over them
    architectures             per-architecture plans and quirks, check_support
    multimodal                vision-language models: where their parts go, positions, masks and images per sample
    hf_patching               the one generic tensor-in / tensor-out forward for Hugging Face stage copies
    activation_checkpointing  checkpointing the decoder layers of every stage
    safetensors_reader        read chosen tensors of a safetensors checkpoint (directory or hub id)
    weight_conversion         transformers' load-time weight conversion per stage, and its reversal on save
    materialize               build on the meta device, give memory (and weights) to this rank's stages only
    checkpoint                save the stages as one Hugging Face directory; optimizer files by FQN; staging
    peft_utils                PEFT adapters spread across stages: checks, saving and loading the adapter
    functional                the spec's functional API: plan, split, patch, materialize, schedule
    runtime                   the stages, schedules per input shape and per-step gradient work a trainer drives
trainer: building and driving a whole pipeline (AutoPipeline, PipelineTrainer) and the Trainer integration
    preflight                 pure checks of model, arguments and data that every rank runs alike
    balance                   where to cut the layers (pp_balance): auto (default), layers, params, time
    cost_model                estimated cost of each piece of a plan, from the config and module shapes
    profiling                 measured cost of each piece of a plan, for pp_balance="time"
    autopipeline              AutoPipeline: split, schedule and inspect in one call
    training_args             the pp_* fields: PipelineArguments, PipelineTrainingArguments
    trainer                   PipelineMixin (the overrides for any Trainer subclass) and PipelineTrainer
    trainer_build             the model a trainer is given, the checks, the split, placing and wrapping
    trainer_batches           one Trainer batch on its way to the schedule
    trainer_loss              compute_pipeline_loss on the last stage, and the training step
    trainer_evaluation        Trainer's prediction_step as a forward-only pipeline pass
    trainer_checkpoint        Trainer's checkpoint hooks, each rank saving and resuming its own stages
    trainer_bookkeeping       model card, counts, flos and tokens seen with Trainer's meaning
    sft_trainer               TRL: PipelineSFTTrainer and PipelineSFTConfig
tools: plans and pictures in one process, and the command line
    planner                   dry-run planner: a layout's stages, memory and bubble, without weights
    __main__                  python -m hf_pp plan ...
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
