"""Orbax checkpoints of the train state, the step, and the best one by eval loss.

A save writes a temporary directory and renames it into place when complete; older steps are
deleted only after that. So a run killed while saving keeps every intact checkpoint it had,
plus a half-written temporary directory that the next start reports and a new save of that
step replaces. A checkpoint damaged later (a truncated or deleted file) fails to restore: it is
moved aside with a warning and the next older one is used, then the best one. If damaged ones
were there but none restores, the run refuses to start over unless train.restart_if_damaged.
Each save carries a manifest of checksums, one per routed expert and one per other tensor
(manifest.py); a restore onto any layout checks the arrays it produced against it, so a
checkpoint with an expert missing, duplicated or altered is refused in one line and the
fallback above is taken. One saved before manifests existed restores with a warning.
"""

import contextlib
import errno
import logging
import os
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from moejax import parallel
from moejax.config_lib import ConfigError, first_line
from moejax.data.loader import DataState, DataStateRestore, DataStateSave
from moejax.run import manifest as manifest_lib

log = logging.getLogger(__name__)


def handlers():
    return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
            "data": DataState(), "manifest": ocp.JsonCheckpointHandler()}


def params_handlers():
    """To read another run's parameters: the PyTree handler, not the Standard one, since
    `restore_params` reads part of the state."""
    return {"state": ocp.PyTreeCheckpointHandler(), "manifest": ocp.JsonCheckpointHandler()}


class Checkpoints:
    """`latest` keeps the last `keep` steps; `best` (optional) the one with the lowest eval loss.

    Saves are asynchronous: training goes on while the files are written.
    """

    def __init__(self, workdir: str, keep: int, keep_best: bool):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.workdir = workdir
        self.latest = ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                            options=options, item_handlers=handlers())
        self.best_dir = os.path.join(os.path.abspath(workdir), "best")
        self.best = None
        if keep_best:
            best = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_mode="min",
                                                best_fn=lambda m: m["eval_loss"])
            self.best = ocp.CheckpointManager(self.best_dir, options=best,
                                              item_handlers=handlers())

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def save(self, step: int, state, meta: dict, eval_loss: float | None = None,
             data: dict | None = None):
        """`data`: this process's train data iterator state before batch `step`, if any. A
        full disk here (or in the save before, still being written) is one ConfigError line."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta),
                 "manifest": ocp.args.JsonSave(manifest_lib.to_json(checksums(state)))}
        if data is not None:
            items["data"] = DataStateSave(data)
        args = ocp.args.Composite(**items)
        with self.writing():
            self.latest.save(step, args=args, force=True)
            # A run resumed from before a broken checkpoint computes the best one's step again.
            if (self.best is not None and eval_loss is not None
                    and step not in self.best.all_steps()):
                # Both managers name their cross-host barriers by step: let one finish first.
                self.latest.wait_until_finished()
                self.best.save(step, args=args, metrics={"eval_loss": float(eval_loss)},
                               force=True)

    @contextlib.contextmanager
    def writing(self):
        """A write error of the block (or of an asynchronous save before, which it waits for)
        as one ConfigError line: orbax writes each save aside and deletes nothing before it is
        complete, so the newest complete step is intact, and the line names it."""
        try:
            yield
        except Exception as e:
            if (reason := write_error(e)) is None:
                raise
            self.latest.reload()
            good = self.latest.latest_step()
            raise ConfigError(
                f"--workdir={self.workdir!r}: cannot save a "
                f"checkpoint ({reason}); "
                + (f"the newest intact one is {self.latest.directory}/{good}" if good is not None
                   else "none was saved before") + "; allowed: free space there (or a --workdir "
                "on a disk with room), then run the same command again to resume") from None

    def restore(self, step: int, like, mgr: ocp.CheckpointManager | None = None):
        """Restore `step` of `mgr` (default: latest) into arrays shaped and sharded like
        `like` (any mesh); meta["data"], where the checkpoint holds data iterator states, is
        this process's (None: saved by another number of processes)."""
        mgr = mgr or self.latest
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        items = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        if (mgr.directory / str(step) / "data").exists():
            items["data"] = DataStateRestore()
        if has_manifest(mgr, step):
            items["manifest"] = ocp.args.JsonRestore()
        out = mgr.restore(step, args=ocp.args.Composite(**items))
        check_manifest(mgr, step, out.state, out.manifest if "manifest" in items else None)
        return out.state, {**out.meta, **({"data": out.data} if "data" in items else {})}

    def restore_latest(self, like, restart_if_damaged: bool = False):
        """(state, meta) of the newest checkpoint that restores, else of the best one in best/;
        None if there is none. Damaged ones are set aside. If there were damaged ones and none
        restores: ConfigError, or None (start over) with restart_if_damaged."""
        root = str(self.latest.directory)
        for name in sorted(os.listdir(root)) if jax.process_index() == 0 else []:
            if ".orbax-checkpoint-tmp" in name:  # orbax never lists these; a new save replaces it
                log.warning(f"checkpoint {root}/{name} is half-written (the run stopped while "
                            "saving it): skipped")
        found = newest_that_restores(self.latest, lambda step: self.restore(step, like),
                                     self.set_aside)
        if found:
            return found[1]
        with contextlib.ExitStack() as stack:
            best = self.best or read_manager(self.best_dir, handlers())
            if best is not None and best is not self.best:  # keep_best off: read it only
                stack.callback(best.close)
            if best is not None and (found := newest_that_restores(
                    best, lambda step: self.restore(step, like, best),
                    lambda step, error: self.set_aside(step, error, best))):
                log.warning(f"no checkpoint in {root} restores: resuming from the best one, "
                            f"{self.best_dir}/{found[0]}")
                return found[1]
        broken = [f"{os.path.basename(d)}/{n}" for d in (root, self.best_dir)
                  if os.path.isdir(d) for n in sorted(os.listdir(d)) if ".broken-" in n]
        if broken and not restart_if_damaged:
            raise ConfigError(
                f"train.restart_if_damaged=False: no checkpoint in {root} or {self.best_dir} "
                f"restores, and damaged ones were there (set aside: {', '.join(broken)}); "
                "allowed: repair one, or --config.train.restart_if_damaged=True to start over "
                "at step 0")
        if broken:
            log.warning(f"no checkpoint in {root} or {self.best_dir} restores: starting over "
                        "at step 0 (train.restart_if_damaged=True)")
        return None

    def set_aside(self, step: int, error: Exception | None,
                  mgr: ocp.CheckpointManager | None = None):
        """Rename a broken step of `mgr` (default: latest) out of orbax's sight: the next save
        of that step and the rotation must not trip over it, and it stays on disk for a
        post-mortem."""
        mgr = mgr or self.latest
        path = os.path.join(str(mgr.directory), str(step))
        if jax.process_index() == 0:
            aside = f"{path}.broken-{time.strftime('%Y%m%d-%H%M%S')}"
            reason = "failed on another process" if error is None else first_line(error)
            log.warning(f"checkpoint {path} does not restore ({reason}): skipped, "
                        f"moved to {aside}")
            os.rename(path, aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside checkpoint {mgr.directory} {step}")
        mgr.reload()

    def check_shapes(self, params):
        """Raise ConfigError naming the first parameter whose shape in the newest readable
        checkpoint differs from `params` (abstract arrays will do): a changed model config
        must not resume a run. Reads metadata only, so it runs before anything compiles."""
        for step in reversed(self.latest.all_steps()):
            try:
                saved = shapes(self.latest.item_metadata(step)["state"]["params"])
            except Exception:  # unreadable: restore_latest reports it
                continue
            want = shapes(params)
            for name in sorted(saved.keys() | want.keys()):
                if saved.get(name) != want.get(name):
                    raise ConfigError(
                        f"model: {name}: checkpoint {saved.get(name, 'absent')} vs config "
                        f"{want.get(name, 'absent')} in {self.latest.directory}/{step}; allowed: "
                        "the model config the run started with, or a new --workdir")
            return

    def close(self):
        try:
            with self.writing():  # the last save's error, if any, shows here
                for mgr in (self.latest, self.best):
                    if mgr is not None:
                        mgr.wait_until_finished()
        finally:
            for mgr in (self.latest, self.best):
                if mgr is not None:
                    mgr.close()


WRITE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "a read-only file system", errno.EACCES: "permission denied",
                errno.EIO: "an input/output error"}


def write_error(e: BaseException) -> str | None:
    """What went wrong, in a few words, if `e` (or an exception it wraps: orbax raises
    its writers' errors from its own threads and futures) is a disk's refusal to write."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
            return WRITE_ERRORS[e.errno]
        # tensorstore reports a failed write as a ValueError holding the OS's message
        for code, words in WRITE_ERRORS.items():
            if os.strerror(code) in str(e):
                return words
        e = e.__cause__ or e.__context__
    return None


def variables(tree) -> list:
    """(path, leaf) of every array of a state, Variables whole; a Variable holding no array
    (the optax.MaskedNode standing for a leaf the other optimizer of train.optimizer=muon
    owns) left out."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda v: isinstance(v, nnx.Variable))
    return [(p, v) for p, v in flat if parallel.holds_array(v)]


def checksums(tree) -> dict:
    """manifest.checksums of every array of a state (or part of one), by path name."""
    return manifest_lib.checksums([(path_name(p), leaf) for p, leaf in variables(tree)])


def has_manifest(mgr: ocp.CheckpointManager, step: int) -> bool:
    return (mgr.directory / str(step) / "manifest").exists()


def check_manifest(mgr: ocp.CheckpointManager, step: int, restored, manifest: dict | None,
                   partial: bool = False) -> None:
    """ManifestError (one line) unless `restored` (the state, or with `partial` part of it)
    is what the manifest of `step` says was saved; a warning if the step has none."""
    if manifest is None:
        log.warning(f"checkpoint {mgr.directory}/{step} has no manifest (saved before moejax "
                    "wrote them): its experts are restored unverified")
        return
    manifest_lib.verify(checksums(restored), manifest, partial)


def path_name(path) -> str:
    """A params tree path as 'blocks.0.ffn.w_in'."""
    keys = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return ".".join(str(k) for k in keys if k != "value")


def shapes(tree) -> dict:
    """'blocks.0.ffn.w_in' -> shape, for every array of a params tree (live, abstract or saved)."""
    return {path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def newest_that_restores(mgr: ocp.CheckpointManager, restore, skip,
                         replaced=None) -> tuple | None:
    """(step, restore(step)) for the newest step of `mgr` that restores on every process, or
    None; `skip(step, error)` for each newer one that does not (error None: failed on another
    process). `replaced(step)`, for a reader of a run that may be saving meanwhile: a step
    that failed because that run's rotation deleted it while it was read (it is gone, or a
    newer one has appeared); it is not damaged, and the steps are listed again."""
    tried, replacements = set(), 0
    while steps := [s for s in reversed(mgr.all_steps()) if s not in tried]:
        step = steps[0]
        tried.add(step)
        quiet_failed_reads()  # before: a failed read's others may report while it raises
        try:
            restored, error = restore(step), None
        except Exception as e:  # whatever broke, this step cannot be read
            restored, error = None, e
        if on_every_process(error is None):
            return step, restored
        if (replaced is not None and replacements < MAX_REPLACED
                and not on_every_process(still_there(mgr, step, tried))):
            replacements += 1
            replaced(step)
            continue
        skip(step, error)
    return None


def quiet_failed_reads() -> None:
    """For restores that fail, drop what Python would print for each read still running (the
    hook goes in before the restore: those reads report from other threads while the failing
    one is still being raised). orbax runs a restore's reads in an event loop that it closes
    once the first read fails; tensorstore then hands each other read's result to that closed
    loop, and the reads' coroutines are dropped with their own errors. Each reaches
    sys.unraisablehook as a traceback ("Event loop is closed", "Encountered error while reading
    array index"), dozens burying the one line that says the step does not restore. Only these
    two are dropped."""
    previous = sys.unraisablehook
    if getattr(previous, "quiet_failed_reads", False):
        return

    def hook(unraisable):
        tb, code = unraisable.exc_traceback, getattr(unraisable.object, "cr_code", None)
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        closed_loop = (isinstance(unraisable.exc_value, RuntimeError)
                       and str(unraisable.exc_value) == "Event loop is closed"
                       and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed")
        orbax_read = code is not None and ORBAX in code.co_filename
        if not (closed_loop or orbax_read):
            previous(unraisable)

    hook.quiet_failed_reads = True
    sys.unraisablehook = hook


ORBAX = os.path.dirname(ocp.__file__)  # its coroutines, to tell their unraisables apart


MAX_REPLACED = 20  # a run that saves faster than its steps can be read: give up on it


def still_there(mgr: ocp.CheckpointManager, step: int, tried: set) -> bool:
    """Whether `step` is still on disk and no newer step has appeared since it was listed."""
    mgr.reload()
    newer = [s for s in mgr.all_steps() if s > step and s not in tried]
    return os.path.isdir(os.path.join(str(mgr.directory), str(step))) and not newer


def read_manager(path: str, item_handlers) -> ocp.CheckpointManager | None:
    """A manager that only reads `path`, or None if there is no such directory: orbax would
    create it."""
    if not os.path.isdir(path):
        return None
    return ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(create=False),
                                 item_handlers=item_handlers)


def on_every_process(ok: bool) -> bool:
    """All processes must resume from the same step, even if only one of them failed to read."""
    if jax.process_count() == 1:
        return ok
    return bool(multihost_utils.process_allgather(np.int32(ok)).min())


def run_checkpoints(workdir: str, key: str) -> ocp.CheckpointManager:
    """Another run's checkpoints, to read parameters from; ConfigError naming `key` if it has
    none."""
    mgr = read_manager(os.path.join(os.path.abspath(workdir), "checkpoints"), params_handlers())
    if mgr is None or mgr.latest_step() is None:
        if mgr is not None:
            mgr.close()
        raise none_saved(workdir, key)
    return mgr


def none_saved(workdir: str, key: str) -> ConfigError:
    path = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(path):  # read_manager creates nothing in someone else's run
        return ConfigError(f"{key}={workdir!r}: no checkpoints/ in it; allowed: the --workdir "
                           "of a run that saved a checkpoint")
    return ConfigError(f"{key}={workdir!r}: no checkpoint in {path}; allowed: the --workdir of "
                       "a run that saved one")


def restore_params(mgr: ocp.CheckpointManager, step: int, target):
    """The parameters of `step` only, into `target`'s shapes and shardings: not the optimizer
    state, twice their size."""
    target = {"params": target}
    items = {"state": ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)}
    if has_manifest(mgr, step):
        items["manifest"] = ocp.args.JsonRestore()
    out = mgr.restore(step, args=ocp.args.Composite(**items))
    check_manifest(mgr, step, out.state, out.manifest if "manifest" in items else None,
                   partial=True)
    return out.state["params"]


def read_params(workdir: str, key: str, target) -> tuple[int, object]:
    """(step, parameters) of the newest checkpoint of another run whose parameters restore,
    into `target`'s shapes and shardings; else of its best one, as `train` resumes. Damaged
    ones are skipped with a warning and left where they are: this only reads. The run may be
    training meanwhile: a step its rotation deletes while it is read is no loss, the newest
    one is read instead. ConfigError naming `key` if none restores."""
    root = os.path.abspath(workdir)
    latest, best_dir = os.path.join(root, "checkpoints"), os.path.join(root, "best")

    def skip(step, error):
        why = "failed on another process" if error is None else first_line(error)
        log.warning(f"checkpoint {mgr.directory}/{step} does not restore ({why}): skipped")

    def replaced(step):
        log.warning(f"checkpoint {mgr.directory}/{step} was deleted while it was read (its run "
                    "saves on and rotates its checkpoints): reading the newest one again")

    listed = []  # the folders that held a checkpoint
    for path in (latest, best_dir):
        if (mgr := read_manager(path, params_handlers())) is None:
            continue
        with contextlib.closing(mgr):
            if mgr.all_steps():
                listed.append(path)
                found = newest_that_restores(mgr, lambda s: restore_params(mgr, s, target),
                                             skip, replaced)
            else:
                found = None
        if found:
            if path == best_dir:
                log.warning(f"no checkpoint in {latest} "
                            + ("restores" if latest in listed else "(none saved)")
                            + f": using the best one, {best_dir}/{found[0]}")
            return found
    if not listed:
        raise none_saved(workdir, key)
    raise ConfigError(f"{key}={workdir!r}: no checkpoint in {latest} or {best_dir} restores "
                      "(all damaged); allowed: the --workdir of a run with an intact checkpoint")
