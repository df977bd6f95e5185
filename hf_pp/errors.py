"""The one exception type hf_pp raises for user misconfiguration."""

__all__ = ["PipelineConfigError"]


class PipelineConfigError(ValueError):
    """A pipeline setting, model or input that cannot work; the message says what to change.

    Raised by pure checks that every rank runs on the same inputs before any
    collective, so all ranks fail together instead of one rank hanging the rest.
    """
