"""The ``pp_*`` fields: :class:`PipelineArguments`, a dataclass mixin for any ``TrainingArguments`` subclass
(e.g. TRL's ``SFTConfig``), and :class:`PipelineTrainingArguments` = ``PipelineArguments + TrainingArguments``."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .balance import DEFAULT_BALANCE, DEFAULT_PROFILE_SEQ_LEN, check_balance_options
from .cost_model import choose_microbatch_size
from .errors import PipelineConfigError
from .materialize import LOAD_DTYPES
from .parallelize import DATA_PARALLEL_MODES
from .schedules import resolve_schedule

__all__ = ["PipelineArguments", "PipelineTrainingArguments"]


@dataclass
class PipelineArguments:
    """The ``pp_*`` fields, to compose in front of any ``TrainingArguments`` subclass.

    ``HfArgumentParser`` parses the composed class as one set of flags (``--pp_size 2 --learning_rate ...``);
    the ``pp_*`` fields are checked before the parent's own ``__post_init__``.

    Example:
        >>> from dataclasses import dataclass
        >>> from transformers import HfArgumentParser, TrainingArguments
        >>> @dataclass
        ... class MyArguments(PipelineArguments, TrainingArguments):
        ...     pass
        >>> (args,) = HfArgumentParser(MyArguments).parse_args_into_dataclasses(
        ...     ["--output_dir", "out", "--pp_size", "2", "--per_device_train_batch_size", "4", "--report_to", "none"])
        >>> args.pp_size, args.pp_num_microbatches
        (2, 4)
    """

    pp_size: int = field(default=1, metadata={"help": "Number of pipeline stages' ranks (1 = no pipelining)."})
    pp_schedule: str = field(
        default="1f1b",
        metadata={"help": "gpipe, 1f1b, interleaved_1f1b, looped_bfs, interleaved_zero_bubble, zbv_zero_bubble, dual_pipe_v."},
    )
    pp_schedule_csv: str | None = field(default=None, metadata={"help": "Compute-only CSV schedule (overrides pp_schedule)."})
    pp_microbatch_size: int | None = field(
        default=None,
        metadata={"help": "Samples per pipeline microbatch. Unset: chosen from the batch, the schedule's bubble and the "
                          "fixed cost of a microbatch (hf_pp.cost_model.choose_microbatch_size, at pp_balance_seq_len "
                          "tokens or 512): 1 unless the batch is large against the sequence length."},
    )
    pp_layers_per_stage: int | None = field(default=None, metadata={"help": "Decoder layers per (virtual) stage."})
    pp_round_virtual_stages: str | None = field(
        default=None, metadata={"help": "'up' or 'down': round the stage count to a multiple of pp_size."}
    )
    pp_patch_inner_model: bool = field(default=True, metadata={"help": "Patch the decoder forward for pipelining."})
    pp_patch_causal_lm_model: bool = field(default=True, metadata={"help": "Patch the CausalLM forward for pipelining."})
    pp_data_parallel: str = field(
        default="ddp",
        metadata={"help": "When world size > pp_size: 'ddp' (replicated stages, gradients averaged once per optimizer "
                          "step) or 'fsdp' (FSDP2 sharding inside each stage)."},
    )

    pp_load_dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the weights when PipelineTrainer is given a model directory: 'auto' (the "
                          "checkpoint's own, as from_pretrained), 'float32', 'bfloat16' or 'float16'."},
    )
    pp_balance: str = field(
        default=DEFAULT_BALANCE,
        metadata={"help": "Where to cut the layers into stages: 'auto' (default: balance forward+backward FLOPs "
                          "estimated from the config and module shapes at the training sequence length: layers with "
                          "their attention and routed experts, the embeddings' gradient, LM head + loss; no profiling, "
                          "no collective; models without a plan hf_pp knows, or an explicit module_fqns_per_model_part, "
                          "are cut as 'layers'), 'layers' (the same number per stage, the split before 'auto'), 'params' "
                          "(balance parameters; embeddings and LM head count on the end stages) or 'time' (balance "
                          "measured forward+backward time per layer, embeddings and head+loss; profiled once at setup)."},
    )
    pp_balance_seq_len: int | None = field(
        default=None,
        metadata={"help": "Tokens per sample that pp_balance='auto' estimates and 'time' profiles (default: the length "
                          "of the first collated training batch, else 512; capped by max_position_embeddings)."},
    )
    pp_raise_on_nan_inf: bool = field(
        default=False,
        metadata={"help": "Raise on every rank when a training loss is nan/inf (default: warn with step and stage, "
                          "and let Trainer's logging_nan_inf_filter handle it as usual)."},
    )

    def __post_init__(self):
        self._validate_pipeline_fields()
        super().__post_init__()

    @property
    def pp_num_microbatches(self) -> int:
        return self.per_device_train_batch_size // self.pp_microbatch_size

    def _chosen_microbatch_size(self) -> int:
        """The microbatch size when the user sets none (the same on every rank: a function of the fields)."""
        if self.pp_size == 1 or self.per_device_train_batch_size < 1 or getattr(self, "auto_find_batch_size", False):
            return 1  # no pipeline; a batch the checks below refuse; or one Trainer may halve (1 divides any)
        resolve_schedule(self.pp_schedule, self.pp_schedule_csv)  # a bad name is refused as before
        seq_len = self.pp_balance_seq_len if self.pp_balance_seq_len and self.pp_balance_seq_len > 0 \
            else DEFAULT_PROFILE_SEQ_LEN
        return choose_microbatch_size(self.per_device_train_batch_size, self.pp_size, seq_len,
                                      schedule=self.pp_schedule, schedule_csv=self.pp_schedule_csv)

    def _validate_pipeline_fields(self) -> None:
        """Pure checks of the pp_* fields and the settings pipelining cannot combine with."""
        if self.pp_size < 1:
            raise PipelineConfigError(f"pp_size must be at least 1, got {self.pp_size}.")
        if self.pp_microbatch_size is None:
            self.pp_microbatch_size = self._chosen_microbatch_size()
        if self.pp_microbatch_size < 1:
            raise PipelineConfigError(f"pp_microbatch_size must be at least 1, got {self.pp_microbatch_size}.")
        if self.pp_round_virtual_stages not in (None, "up", "down"):
            raise PipelineConfigError(f"pp_round_virtual_stages must be 'up', 'down' or unset, got {self.pp_round_virtual_stages!r}.")
        if self.pp_load_dtype not in LOAD_DTYPES:
            raise PipelineConfigError(f"pp_load_dtype must be one of {LOAD_DTYPES}, got {self.pp_load_dtype!r}.")
        check_balance_options(self.pp_balance, seq_len=self.pp_balance_seq_len)
        if self.pp_data_parallel not in DATA_PARALLEL_MODES:
            raise PipelineConfigError(f"pp_data_parallel must be one of {DATA_PARALLEL_MODES}, got {self.pp_data_parallel!r}.")
        if self.pp_size == 1:
            return
        resolve_schedule(self.pp_schedule, self.pp_schedule_csv)
        if self.per_device_train_batch_size % self.pp_microbatch_size != 0:
            raise PipelineConfigError(
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) must be divisible by "
                f"pp_microbatch_size ({self.pp_microbatch_size})."
            )
        if self.fsdp:
            raise PipelineConfigError(
                "fsdp cannot be combined with pp_size > 1: the Trainer's FSDP would wrap the whole model. For FSDP2 "
                "sharding inside each stage drop fsdp and set pp_data_parallel=\"fsdp\" (launch a multiple of "
                "pp_size ranks), or pass your own PipelineTrainer(parallelize_fn=...)."
            )
        if self.deepspeed:
            raise PipelineConfigError(
                "deepspeed cannot be combined with pp_size > 1: DeepSpeed would wrap the whole model. Drop deepspeed "
                "and, for data parallelism inside each stage, set pp_data_parallel=\"fsdp\" (sharded, like ZeRO-3) "
                "or pp_data_parallel=\"ddp\" (replicated) and launch a multiple of pp_size ranks, or pass your own "
                "PipelineTrainer(parallelize_fn=...); or set pp_size=1 to keep DeepSpeed."
            )
        if getattr(self, "parallelism_config", None) is not None:
            raise PipelineConfigError(
                "parallelism_config cannot be combined with pp_size > 1; pipeline layout comes from the pp_* fields "
                "and other parallelism from PipelineTrainer(parallelize_fn=...)."
            )
        if self.fp16:
            raise PipelineConfigError("fp16 is not supported with pp_size > 1 (no loss scaler across stages); use bf16=True.")
        if getattr(self, "predict_with_generate", False):
            raise PipelineConfigError("predict_with_generate is not supported with pp_size > 1: generation needs the whole model.")


@dataclass
class PipelineTrainingArguments(PipelineArguments, TrainingArguments):
    """Training arguments for :class:`hf_pp.PipelineTrainer`.

    Every ``TrainingArguments`` field keeps its meaning; ``per_device_train_batch_size``
    is the batch one pipeline (one data-parallel replica) runs per step, cut
    into ``per_device_train_batch_size / pp_microbatch_size`` microbatches.

    Example:
        >>> args = PipelineTrainingArguments(output_dir="out", pp_size=2, pp_schedule="gpipe",
        ...                                  per_device_train_batch_size=4, report_to="none")
        >>> args.pp_size, args.pp_num_microbatches
        (2, 4)
    """
