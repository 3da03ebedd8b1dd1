"""What a run keeps in its workdir besides checkpoints and metrics: the lock that keeps a second
run out, and the config of every launch (config.json is the latest; configs/launch-<step>.json
the one that started at each step).
"""

import contextlib
import fcntl
import json
import os
import socket
import time

import jax

from moejax.config_lib import ConfigError
from moejax.run.checkpoint import on_every_process

LOCK = "lock"


@contextlib.contextmanager
def lock(workdir: str):
    """Hold `workdir/lock` while the block runs; ConfigError if another live run holds it. Only
    process 0 takes it; every process stops if it is refused."""
    error, fd = None, None
    if jax.process_index() == 0:
        try:
            fd = _take(workdir)
        except ConfigError as e:
            error = e
    if not on_every_process(error is None):
        if fd is not None:
            _release(workdir, fd)
        raise error or ConfigError(f"--workdir={workdir!r}: in use by another run (process 0 "
                                   "was refused its lock); allowed: a workdir no other run uses")
    try:
        yield
    finally:
        if fd is not None:
            _release(workdir, fd)


def _take(workdir: str) -> int:
    """The open lock file, flock-ed and naming this process. The kernel drops a flock when its
    holder dies however it dies, so a killed run leaves no lock that blocks, and of several
    starts taking over a dead run's lock exactly one wins. The pid, host and start time in the
    file are for the message, and for hosts whose shared filesystem has no locks."""
    path = os.path.join(workdir, LOCK)
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _in_use(workdir, path, _read(path), mine) from None
        except OSError:  # a filesystem without locks: the file's content is all there is
            pass
        try:  # the holder may have released (removed the file) between our open and flock
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    holder = _read(path)
    if holder is not None and _alive(holder) and holder != mine:
        # Not flock-ed, yet named by a live process: a run on another host (locks do not reach
        # across every shared filesystem) or a run of a version without flock.
        os.close(fd)
        raise _in_use(workdir, path, holder, mine)
    if os.fstat(fd).st_size:
        what = ("unreadable" if holder is None else
                f"process {holder['pid']} on {holder['host']} since {holder['since']}, "
                "no longer running")
        print(f"workdir: taking over the stale lock {path} ({what})", flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(mine).encode(), 0)
    return fd


def _in_use(workdir: str, path: str, holder: dict | None, mine: dict) -> ConfigError:
    if holder is None:  # flock-ed but not yet written: a run starting this very moment
        return ConfigError(f"--workdir={workdir!r}: in use by a run that is starting; allowed: "
                           "a workdir no other run uses")
    host_note = "" if holder["host"] == mine["host"] else (
        f", or remove {path} if that run has ended (another host: its process cannot be "
        "checked from here)")
    return ConfigError(f"--workdir={workdir!r}: in use by process {holder['pid']} on "
                       f"{holder['host']} since {holder['since']}; allowed: a workdir no other "
                       f"run uses{host_note}")


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if {"pid", "host", "since"} <= holder.keys() else None
    except (OSError, ValueError, AttributeError):
        return None


def _alive(holder: dict) -> bool:
    if holder["host"] != socket.gethostname():
        return True  # no way to ask another host; assume it runs
    try:
        os.kill(holder["pid"], 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def _release(workdir: str, fd: int) -> None:
    """Remove the file, then drop the flock: a start that opened the file meanwhile sees it
    gone and opens the next one."""
    path = os.path.join(workdir, LOCK)
    holder = _read(path)
    if holder and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
        os.remove(path)
    os.close(fd)


def flat(tree: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


ABSENT = object()  # a key one side of a comparison does not have


def changed_keys(workdir: str, config) -> list[tuple[str, object, object]]:
    """(key, saved value, value now) for each key whose value differs from the config.json
    the workdir holds; none if it holds none."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        before = flat(json.load(f))
    now = flat(json.loads(config.to_json_best_effort()))
    return [(key, before.get(key, ABSENT), now.get(key, ABSENT))
            for key in sorted(before.keys() | now.keys())
            if before.get(key, ABSENT) != now.get(key, ABSENT)]


def config_changes(workdir: str, config) -> list[str]:
    """One line per key whose value differs from the config.json of the launch before."""
    def show(value):
        return "(absent)" if value is ABSENT else json.dumps(value)

    return [f"config: {key} {show(before)} -> {show(now)} (resumed run)"
            for key, before, now in changed_keys(workdir, config)]


def save_config(workdir: str, config, start_step: int) -> None:
    """config.json (what generate and convert read) and configs/launch-<start_step>.json, so a
    resumed run keeps the config each of its launches trained with."""
    text = config.to_json_best_effort(indent=2)
    os.makedirs(os.path.join(workdir, "configs"), exist_ok=True)
    for name in ("config.json", f"configs/launch-{start_step}.json"):
        with open(os.path.join(workdir, name), "w") as f:
            f.write(text)
