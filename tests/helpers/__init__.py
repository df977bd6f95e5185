"""Shared pieces of the test suite (not tests themselves): import them as ``helpers.<module>``.

``tests/`` is on the import path through pytest's ``pythonpath`` option (setup.cfg), and ranks started by
:func:`helpers.distributed.run_distributed` inherit the parent's path, so they import test modules and
these helpers by the same names.

- ``distributed``: ``run_distributed(fn, world_size)``, N gloo ranks with a hard timeout, forked from a server
  that imported torch, transformers and peft once per session; ``free_port``.
- ``hf_models``: tiny Hugging Face models built from configs, and the model types the sweep covers.
- ``hf_parity``: a pipelined forward/backward compared with the unsplit model.
- ``trainer_fixtures``: a tiny Llama, a counting dataset and the padding collator the Trainer tests share.
- ``custom_models``: non-Hugging-Face models for the functional API, and their stage plans.
- ``sft_fixtures``: tokenizer and datasets for the TRL tests.
- ``reliability_job``: a short training run where one rank fails on purpose, launched with
  ``torchrun -m helpers.reliability_job`` from ``tests/``.
"""
