"""Saving and resuming under pipelining: Trainer's checkpoint hooks, each rank writing and reading only
its own stages (by original FQN, so a checkpoint resumes under another layout)."""

from __future__ import annotations

import os
import shutil
from typing import Callable

import torch
import torch.distributed as dist
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, get_last_checkpoint, rotate_checkpoints
from transformers.utils import logging

from .checkpoint import (
    PIPELINE_OPTIMIZER, TRAINER_OPTIMIZER, apply_optimizer_load, load_optimizer_state_by_fqn, load_stage_weights,
    merged_optimizer_state, missing_checkpoint_files, pipeline_optimizer_format, plan_optimizer_load, publish_checkpoint,
    save_optimizer_state, save_pipeline_model, staging_dir, trainer_optimizer_state_by_fqn, unseen_by_some, writer_of,
)
from .errors import PipelineConfigError
from .grads import tied_copies_to_skip
from .peft_utils import active_adapter_name, adapter_subdir, load_pipeline_adapter, save_pipeline_adapter, unwrap_peft

__all__ = ["CheckpointOverrides"]

logger = logging.get_logger("transformers.trainer")  # Trainer's logger: its saves log where Trainer's do


class CheckpointOverrides:
    """Trainer's save / load hooks under pipelining (mixed into PipelineMixin)."""

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Writes one Hugging Face model directory from all stages (each pipeline rank writes its own shard).

        Replaces Trainer's single-process ``save_pretrained``; every rank must call it.
        """
        if self._pp is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        if os.path.isfile(output_dir):
            raise PipelineConfigError(f"save_model: {output_dir!r} is a file; pass a directory to write the model into.")
        pp = self._pp
        if self.args.should_save:
            logger.info(f"Saving model checkpoint to {output_dir}")  # Trainer's line, from the process that writes
        if self._peft_model is not None:
            save_pipeline_adapter(output_dir, self._peft_model, pp.parts, pp.pp_group, write=pp.dp_rank == 0)
        else:
            save_pipeline_model(
                output_dir, pp.parts, pp.pp_group, config=self.model.config,
                generation_config=self.model.generation_config, drop=tied_copies_to_skip(pp.tied_groups),
                write=pp.dp_rank == 0,
            )
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Each rank reads only its stages' tensors (by FQN, so any pp_size or schedule) from the checkpoint.

        A missing shard or a checkpoint of another model raises the same
        :class:`PipelineConfigError` on every rank.
        """
        if self._pp is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        if self._peft_model is not None:
            # A PEFT checkpoint holds the adapter only (as Trainer's does); the base weights are the model's.
            adapter_dir = adapter_subdir(resume_from_checkpoint, active_adapter_name(self._peft_model))
            adapter = os.path.join(adapter_dir, "adapter_model.safetensors")
            self._pp_agree_on_files(resume_from_checkpoint, [] if os.path.isfile(adapter) else [adapter], lambda missing: (
                f"{adapter} is missing: resume a PEFT run from a checkpoint of a PEFT run."))
            self._pp_on_every_rank(lambda: load_pipeline_adapter(self._peft_model, self._pp.parts, resume_from_checkpoint))
            return
        self._pp_agree_on_files(resume_from_checkpoint, missing_checkpoint_files(resume_from_checkpoint, optimizer=False),
                                lambda missing: (
            f"Checkpoint {resume_from_checkpoint!r} is incomplete: {_named(missing)} missing. Resume from "
            "a complete checkpoint (one written to the end by every pipeline rank)."))
        self._pp_on_every_rank(lambda: load_stage_weights(self._pp.parts, resume_from_checkpoint, self._pp.tied_groups))

    def _pp_resolve_resume(self, resume_from_checkpoint):
        """``resume_from_checkpoint=True``: the last checkpoint of ``output_dir``, the same on every rank.

        Trainer looks it up on each process; under pipelining ranks that see another last checkpoint (or none)
        would part ways at the first collective, so every rank compares and all raise one error naming them.
        """
        if self._pp is None or not (isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint):
            return resume_from_checkpoint
        found = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        seen: list = [None] * dist.get_world_size()
        dist.all_gather_object(seen, found)
        if len(set(seen)) > 1:
            by_view: dict = {}
            for rank, path in enumerate(seen):
                by_view.setdefault(path, []).append(rank)
            views = "; ".join(f"ranks {ranks} find {path or 'none'}" for path, ranks in by_view.items())
            raise PipelineConfigError(
                f"resume_from_checkpoint=True: the ranks do not see the same last checkpoint in output_dir "
                f"{self.args.output_dir!r} ({views}). Put output_dir on a file system every node shares, or pass "
                "resume_from_checkpoint=<path> that every rank can read."
            )
        return found if found is not None else resume_from_checkpoint  # none anywhere: Trainer's own error

    def _pp_agree_on_files(self, checkpoint: str, missing: list[str], incomplete: Callable[[list[str]], str]) -> None:
        """Every rank compares what it finds missing of ``checkpoint`` before any collective that reads it.

        Ranks that lack files other ranks see (a directory on a file system not every node shares) are named;
        files missing everywhere raise ``incomplete(missing)``. The same error on every rank.
        """
        views: list = [None] * dist.get_world_size()
        dist.all_gather_object(views, sorted(missing))
        unseen = unseen_by_some(views)
        if unseen:
            blind = sorted(unseen)
            files = sorted({f for fs in unseen.values() for f in fs})
            seeing = [r for r in range(len(views)) if r not in unseen]
            raise PipelineConfigError(
                f"Checkpoint {checkpoint!r} looks different from different ranks: ranks {blind} cannot see "
                f"{_named(files)}, which ranks {seeing} see. Put the checkpoint (output_dir) on a file system every "
                "node shares, or copy it to every node at the same path, then resume."
            )
        if views[0]:
            raise PipelineConfigError(incomplete(views[0]))

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: every rank reloads its stages from the best checkpoint."""
        if self._pp is None:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def _pp_on_every_rank(self, load: Callable[[], None]) -> None:
        """Run ``load`` on every rank; if it fails on any, raise its error on all (none is left waiting)."""
        error = None
        try:
            load()
        except (PipelineConfigError, FileNotFoundError) as exc:
            error = str(exc)
        errors: list = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        failed = {rank: e for rank, e in enumerate(errors) if e}
        if failed:
            rank, first = next(iter(failed.items()))
            raise PipelineConfigError(f"Loading the checkpoint failed on ranks {sorted(failed)}; rank {rank}: {first}")

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, written atomically: every rank writes into a hidden staging
        directory; once all are done, one rank renames it to ``checkpoint-N``.

        A crash mid-save leaves only the staging directory, which neither
        ``resume_from_checkpoint=True`` nor ``save_total_limit`` ever looks at.
        """
        if self._pp is None:
            return super()._save_checkpoint(model, trial)
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        staged = staging_dir(final)
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # left by an earlier crash
        dist.barrier()
        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(staged, _internal_call=True)
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staged)
            self._save_scaler(staged)
            self._save_rng_state(staged)
        best = self.state.best_global_step
        if self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST) and best:
            best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{best}")
            if best == self.state.global_step or os.path.exists(best_dir):
                self.state.best_model_checkpoint = best_dir
        if self.args.should_save:
            for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                name = cb.__class__.__name__
                if isinstance(self.state.stateful_callbacks[name], list):
                    self.state.stateful_callbacks[name].append(cb.state())
                else:
                    self.state.stateful_callbacks[name] = cb.state()
            self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        dist.barrier()  # every rank's files are in the staging directory
        # should_save holds on rank 0 alone: preflight refuses save_on_each_node=True across nodes, and on one
        # node its local rank 0 is rank 0. Two publishers would race to rename and rotate the same directory.
        if self.args.should_save:
            publish_checkpoint(staged, final)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        dist.barrier()
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Every rank writes its own parameters' optimizer state, by FQN (``torch.distributed.checkpoint``:
        FSDP shards as shards, replicated state once); the scheduler as Trainer writes it."""
        if self._pp is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        save_optimizer_state(self.optimizer, self.model.original_named_parameters(),
                             os.path.join(output_dir, PIPELINE_OPTIMIZER))
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Each rank reads its parameters' optimizer state, by FQN, and nothing else.

        So a checkpoint resumes under another ``pp_size``, schedule or data-parallel size, a ``Trainer``
        checkpoint (``optimizer.pt``) resumes here, and so does one written by hf_pp 0.1 (one
        ``optimizer.ppNNN.pt`` per pipeline rank). Without pipelining a pipelined checkpoint resumes the same
        way (plain ``Trainer`` would find no ``optimizer.pt`` and silently start the optimizer afresh).
        """
        if checkpoint is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        written_by = pipeline_optimizer_format(checkpoint)
        if written_by is None and (self._pp is None or os.path.isfile(os.path.join(checkpoint, TRAINER_OPTIMIZER))):
            if self._pp is None:
                return super()._load_optimizer_and_scheduler(checkpoint)
            written_by = "trainer"
        named = self.model.original_named_parameters() if self._pp is not None else unwrap_peft(self.model).named_parameters()
        if self._pp is not None:  # before the collective read, every rank must see the same files
            missing = missing_checkpoint_files(checkpoint, weights=False) if written_by != "trainer" else []
            self._pp_agree_on_files(checkpoint, missing, lambda missing: (
                f"Checkpoint {checkpoint!r} has no {_named(missing)}: it was saved with save_only_model=True, "
                "not by a pipeline run, or not to the end. Resume from a complete checkpoint."))

        directory, planned = os.path.join(checkpoint, PIPELINE_OPTIMIZER), {}

        def load() -> None:
            if written_by == "dcp":  # checked here on every rank; read below, together (a collective)
                planned["plan"] = plan_optimizer_load(self.optimizer, named, directory)
                return
            if written_by == "trainer":
                saved = trainer_optimizer_state_by_fqn(checkpoint, self._pp_trainer_optimizer_order)
            else:
                saved = merged_optimizer_state(checkpoint, map_location="cpu")  # load_state_dict moves it to each parameter
            load_optimizer_state_by_fqn(self.optimizer, saved, named)

        if self._pp is None:
            load()
        else:
            self._pp_on_every_rank(load)
        if "plan" in planned:
            apply_optimizer_load(self.optimizer, planned["plan"], directory)
        self._load_scheduler(checkpoint)

    def _load_scheduler(self, checkpoint: str) -> None:
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))


def _named(files: list[str], limit: int = 6) -> str:
    """Files for a message, each with the rank that writes it where one does."""
    shown = [f"{f} (written by {writer_of(f)})" if writer_of(f) else f for f in files[:limit]]
    return ", ".join(shown) + (f" and {len(files) - limit} more" if len(files) > limit else "")
