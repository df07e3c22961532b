"""Orbax checkpoints of what training changes: the prompt, the optimizer state and the step.

CLIP is frozen and reloaded from its source, so a checkpoint is tens of kilobytes (about 92 KB at ViT-B/16
shapes). The data position is the step itself: the training iterator is a pure function of (seed, step), so
resuming at step s replays exactly the batches an uninterrupted run would have seen from s on.

A kill at any moment (SIGKILL, a lost host) never leaves a checkpoint that looks complete and is not: orbax
writes each step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only once every file is
written (on a local or NFS path; object stores get a commit file instead), and unfinished ones are not listed
as steps. The next run's manager deletes those leftovers. A kill in the middle of deleting a step (one
beyond `max_to_keep`, or one newer than the step a run resumes from) can leave it half deleted and still
listed: `train._restore` skips any step it cannot read for the previous one.
"""

from __future__ import annotations

import orbax.checkpoint as ocp

from dspt_jax import files


class Checkpointer:
    """`save(step, state)` every `every_steps` (and when forced), `restore(template)` of the latest one."""

    def __init__(self, directory: str, every_steps: int, max_to_keep: int = 2):
        self._manager = ocp.CheckpointManager(
            files.absolute(directory),  # a local path or a bucket URL (gs://): orbax writes either
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                save_interval_steps=max(1, every_steps),
                create=True,
                # Unfinished writes of a killed run: never read (not listed as steps), but they would pile up.
                cleanup_tmp_directories=True,
            ),
        )

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    @property
    def steps(self) -> list[int]:
        """The steps of the checkpoints kept, oldest first."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` would write (every `every_steps`)."""
        return self._manager.should_save(step)

    def save(self, step: int, state, force: bool = False) -> bool:
        return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

    def restore(self, template, step: int | None = None):
        """The state at `step` (default: latest), with the structure, shardings and dtypes of `template`."""
        step = self.latest_step if step is None else step
        return self._manager.restore(step, args=ocp.args.StandardRestore(template))

    def delete(self, step: int) -> None:
        """Removes the checkpoint of `step` (an unreadable one, or one newer than the step resumed from,
        which a later save of the same step would otherwise collide with)."""
        self._manager.delete(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
