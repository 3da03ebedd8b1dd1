"""What a run keeps in its workdir besides checkpoints and metrics: the lock that keeps a second
run out, and the config of every launch (config.json is the latest; configs/launch-<step>.json
the one that started at each step).
"""

import contextlib
import json
import os
import socket
import time

import jax

from moejax.checkpoint import on_every_process
from moejax.config_lib import ConfigError

LOCK = "lock"


@contextlib.contextmanager
def lock(workdir: str):
    """Hold `workdir/lock` (pid, host, start time) while the block runs; ConfigError if another
    live run holds it. Only process 0 takes it; every process stops if it is refused."""
    error = None
    if jax.process_index() == 0:
        try:
            _take(workdir)
        except ConfigError as e:
            error = e
    if not on_every_process(error is None):
        raise error or ConfigError(f"--workdir={workdir!r}: in use by another run (process 0 "
                                   "was refused its lock); allowed: a workdir no other run uses")
    try:
        yield
    finally:
        if jax.process_index() == 0:
            _release(workdir)


def _take(workdir: str) -> None:
    path = os.path.join(workdir, LOCK)
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):  # the second try follows the removal of a stale lock
        try:
            # O_EXCL: creating the file is the test-and-set; of two starts, one fails here.
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is not None and _alive(holder):
                host_note = "" if holder["host"] == mine["host"] else (
                    f", or remove {path} if that run has ended (another host: its process "
                    "cannot be checked from here)")
                raise ConfigError(
                    f"--workdir={workdir!r}: in use by process {holder['pid']} on "
                    f"{holder['host']} since {holder['since']}; allowed: a workdir no other run "
                    f"uses{host_note}") from None
            # A run killed without cleaning up (SIGKILL, a crash, SIGTERM while starting).
            # Two starts taking over the same stale lock in the same instant could both win;
            # that needs a kill and two launches within microseconds.
            what = ("unreadable" if holder is None else
                    f"process {holder['pid']} on {holder['host']} since {holder['since']}, "
                    "no longer running")
            print(f"workdir: taking over the stale lock {path} ({what})", flush=True)
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        return
    raise ConfigError(f"--workdir={workdir!r}: another run took {path} while this one took "
                      "over its stale lock; allowed: a workdir no other run uses")


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


def _release(workdir: str) -> None:
    path = os.path.join(workdir, LOCK)
    holder = _read(path)
    if holder and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname():
        os.remove(path)


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
