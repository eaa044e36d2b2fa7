"""Trainer checkpoints that appear whole or not at all.

``transformers.Trainer`` writes ``checkpoint-<step>/`` file by file; a process killed in the middle (a
``kill -9``, an out-of-memory kill, a pre-empted node) leaves a directory that looks like a checkpoint
and is not one, and ``--resume latest`` would pick it. :func:`atomic_checkpoint` makes the Trainer
write into ``.incomplete-checkpoint-<step>/checkpoint-<step>/`` instead and renames the finished
directory to ``checkpoint-<step>`` (one ``rename``, atomic on POSIX file systems). A leftover
``.incomplete-*`` directory is never a checkpoint (the Trainer's and our checkpoint lookups match
``checkpoint-<digits>`` only) and is removed by the next save of that step.

(A kill needs no ``fsync``: written pages survive the process. A power cut could still lose the last
writes; the rename order is then the file system's.)
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

STAGING_PREFIX = ".incomplete-"


@contextmanager
def atomic_checkpoint(trainer, trial=None):
    """Around ``Trainer._save_checkpoint``: yields the staging directory the checkpoint is written to
    (add files there), then publishes it as ``<run dir>/checkpoint-<step>`` and rotates old checkpoints
    (``save_total_limit``). An exception leaves the previous checkpoints untouched and nothing new."""
    run_dir = trainer._get_output_dir(trial=trial)
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    staging_run = os.path.join(run_dir, STAGING_PREFIX + name)
    staged, final = os.path.join(staging_run, name), os.path.join(run_dir, name)
    accelerator = trainer.accelerator
    if trainer.args.should_save:
        shutil.rmtree(staging_run, ignore_errors=True)  # what a killed save of this step left
    accelerator.wait_for_everyone()
    trainer._get_output_dir = lambda trial=None: staging_run  # the Trainer writes its files there
    try:
        yield staged
    finally:
        del trainer._get_output_dir
    accelerator.wait_for_everyone()  # every rank wrote its files (RNG states are per rank)
    if trainer.args.should_save:
        state = trainer.state
        if state.best_model_checkpoint and state.best_model_checkpoint.startswith(staging_run):
            state.best_model_checkpoint = final
            state.save_to_json(os.path.join(staged, "trainer_state.json"))
        _publish(staged, final)
        shutil.rmtree(staging_run, ignore_errors=True)
        _rotate(trainer, run_dir)
    accelerator.wait_for_everyone()


def _publish(staged: str, final: str) -> None:
    """Rename ``staged`` to ``final``; an existing ``final`` (the same step saved again) is replaced."""
    if not os.path.exists(final):
        os.rename(staged, final)
        return
    old = final + ".replaced"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(final, old)
    os.rename(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def _rotate(trainer, run_dir: str) -> None:
    """Trainer's own rotation of old checkpoints (``save_total_limit``), in the real run directory."""
    legacy = getattr(trainer, "_rotate_checkpoints", None)
    if legacy is not None:  # transformers < 5
        legacy(use_mtime=False, output_dir=run_dir)
        return
    from transformers.trainer_utils import rotate_checkpoints

    rotate_checkpoints(
        output_dir=run_dir,
        save_total_limit=trainer.args.save_total_limit,
        best_model_checkpoint=trainer.state.best_model_checkpoint,
        use_mtime=True,
    )
