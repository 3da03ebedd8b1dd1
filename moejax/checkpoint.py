"""Orbax checkpoints of the train state, the step, and the best one by eval loss."""

import os

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """`latest` keeps the last `keep` steps; `best` (optional) the one with the lowest eval loss.

    Saves are asynchronous: training goes on while the files are written.
    """

    def __init__(self, workdir: str, keep: int, keep_best: bool):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.latest = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                            options=options, item_names=("state", "meta"))
        self.best = None
        if keep_best:
            best = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_mode="min",
                                                best_fn=lambda m: m["eval_loss"])
            self.best = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "best"),
                                              options=best, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, state, meta: dict, eval_loss: float | None = None):
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(meta))
        self.latest.save(step, args=args, force=True)
        if self.best is not None and eval_loss is not None:
            # Both managers name their cross-host barriers by step: let one finish first.
            self.latest.wait_until_finished()
            self.best.save(step, args=args, metrics={"eval_loss": float(eval_loss)}, force=True)

    def restore(self, step: int, like):
        """Restore `step` into arrays shaped and sharded like `like` (any mesh)."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        out = self.latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return out.state, out.meta

    def close(self):
        for mgr in (self.latest, self.best):
            if mgr is not None:
                mgr.wait_until_finished()
                mgr.close()
