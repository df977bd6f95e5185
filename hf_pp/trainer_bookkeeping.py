"""Trainer's bookkeeping with Trainer's meaning under pipelining: a pipeline is one data-parallel replica,
not ``pp_size`` of them, and the model is every stage, not this rank's.

Batch sizes (logged and in the model card) count data-parallel replicas; the trainable-parameter count
Trainer logs, ``total_flos`` and ``num_input_tokens_seen`` count the whole model and each token once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Iterator

__all__ = ["BookkeepingOverrides", "data_parallel_view"]

_TRAINABLE_LINE = "  Number of trainable parameters = "


def data_parallel_view(args, dp_size: int):
    """A copy of ``args`` whose ``world_size`` is the number of data-parallel replicas.

    For the summaries Trainer writes from ``args.world_size`` (the model card), which mean replicas.

    Example:
        >>> from transformers import TrainingArguments
        >>> view = data_parallel_view(TrainingArguments(output_dir="out", report_to="none"), 3)
        >>> view.world_size, isinstance(view, TrainingArguments)
        (3, True)
    """
    view = copy.copy(args)
    view.__class__ = type(type(args).__name__, (type(args),), {"world_size": property(lambda _: dp_size)})
    return view


class _TrainableCountLine(logging.Filter):
    """Rewrites Trainer's "Number of trainable parameters" line (it counts one rank's stages) to the pipeline's."""

    def __init__(self, trainable: int):
        super().__init__()
        self.trainable = trainable

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(_TRAINABLE_LINE):
            record.msg, record.args = f"{_TRAINABLE_LINE}{self.trainable:,}", ()
        return True


class BookkeepingOverrides:
    """Counts and summaries (mixed into PipelineMixin)."""

    def get_total_train_batch_size(self, args) -> int:
        """Trainer counts every rank as a data-parallel replica; a pipeline is one replica."""
        if self._pp is None:
            return super().get_total_train_batch_size(args)
        return args.per_device_train_batch_size * args.gradient_accumulation_steps * self._pp.dp_size

    def floating_point_ops(self, inputs) -> int:
        """Trainer's estimate (6 x tokens x non-embedding parameters of the whole model), counted once per
        replica: by the first pipeline rank (Trainer sums this over every process)."""
        if self._pp is None or self._pp.pp_rank == 0:
            return super().floating_point_ops(inputs)
        return 0

    def _track_num_input_tokens(self, inputs) -> None:
        """Trainer's count gathers over every process; the ranks of one pipeline see the same tokens."""
        before = self.state.num_input_tokens_seen
        super()._track_num_input_tokens(inputs)
        if self._pp is not None:
            pp_size = self.args.pp_size
            self.state.num_input_tokens_seen = before + (self.state.num_input_tokens_seen - before) // pp_size

    def create_model_card(self, *args, **kwargs) -> None:
        """Trainer's model card; its ``num_devices`` and total batch sizes count data-parallel replicas."""
        if self._pp is None:
            return super().create_model_card(*args, **kwargs)
        from transformers.modelcard import TASK_MAPPING, _get_mapping_values

        if kwargs.get("tasks") is None and len(args) < 5:
            # Trainer infers the task from the model's class; the stand-in for the stages has none.
            kwargs["tasks"] = next((task for task, mapping in reversed(TASK_MAPPING.items())
                                    if self._pp_model_class_name in _get_mapping_values(mapping)), None)
        real = self.args
        self.args = data_parallel_view(real, self._pp.dp_size)
        try:
            return super().create_model_card(*args, **kwargs)
        finally:
            self.args = real

    @contextlib.contextmanager
    def _pipeline_log_counts(self) -> Iterator[None]:
        """During ``train()``: Trainer's trainable-parameter line counts every stage of the pipeline."""
        if self._pp is None:
            yield
            return
        trainer_logger = logging.getLogger("transformers.trainer")
        line = _TrainableCountLine(self.model.num_parameters(only_trainable=True))
        trainer_logger.addFilter(line)
        try:
            yield
        finally:
            trainer_logger.removeFilter(line)
