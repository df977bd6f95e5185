"""The one exception type hf_pp raises for user misconfiguration."""

__all__ = ["PipelineConfigError"]


class PipelineConfigError(ValueError):
    """A pipeline setting, model or input that cannot work; the message says what to change.

    Raised by pure checks that every rank runs on the same inputs before any
    collective, so all ranks fail together instead of one rank hanging the rest.
    It is a ``ValueError``, so code that already catches those keeps working.

    Example:
        >>> from hf_pp import PipelineTrainingArguments
        >>> try:
        ...     PipelineTrainingArguments(output_dir="out", pp_size=2, per_device_train_batch_size=3,
        ...                               pp_microbatch_size=2, report_to="none")
        ... except PipelineConfigError as err:
        ...     print(err)
        per_device_train_batch_size (3) must be divisible by pp_microbatch_size (2).
        >>> issubclass(PipelineConfigError, ValueError)
        True
    """
