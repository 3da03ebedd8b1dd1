"""One process of a multi-process fuzz draw (tests/test_fuzz.py, run_processes):
python -m tests.fuzz_worker SEED PROCESSES PROCESS_ID COORDINATOR START1.pickle OUT.pickle
START1 holds the reference's state after step 0; process 0 writes what test_fuzz.run
recorded, every array gathered whole from all processes."""

import dataclasses
import pickle
import sys

import jax


def main(seed: int, processes: int, process_id: int, coordinator: str, start1: str,
         out: str) -> None:
    jax.distributed.initialize(coordinator, processes, process_id)
    from tests import test_fuzz

    d = dataclasses.replace(test_fuzz.draw(seed), processes=processes)
    with open(start1, "rb") as f:
        start = pickle.load(f)
    got = test_fuzz.run(test_fuzz.config_of(d), fuzzed=True, start1=start)
    if process_id == 0:
        with open(out, "wb") as f:
            pickle.dump(got, f)


if __name__ == "__main__":
    seed, processes, process_id, coordinator, start1, out = sys.argv[1:]
    main(int(seed), int(processes), int(process_id), coordinator, start1, out)
