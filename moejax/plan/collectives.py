"""Bytes each collective of a compiled, SPMD-partitioned program moves, read off its HLO text.

payload = bytes of the operands one device hands to the op (an all-to-all's payload includes
the block addressed to itself); wire = what leaves the device with the usual algorithms:
all-to-all and reduce-scatter (n-1)/n of the payload, ring all-reduce 2(n-1)/n, all-gather
(n-1) x, collective-permute 1 x, for groups of n devices. Ops inside loops count once per
iteration.
"""

import math
import re

COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
# Bytes that leave a device per payload byte, for a group of n devices (see the docstring).
WIRE = {"all-to-all": lambda n: (n - 1) / n, "reduce-scatter": lambda n: (n - 1) / n,
        "all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: n - 1,
        "collective-permute": lambda n: 1.0}

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(?:body|condition|calls|to_apply)=%([\w.-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: one array or a tuple of them."""
    return sum(DTYPE_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(shape))


def first_group(attrs: str, num_devices: int) -> list[int]:
    """The device ids of an op's first replica group, in any of the three forms XLA prints:
    iota ([groups,size]<=[dims]T(perm)), explicit ({{0,1},{2,3}}) or a mesh's named axes
    (mesh['axis_0'=2,'axis_1'=4] {'axis_1'}: the named axes vary, the others at 0). Ids are
    positions in the mesh's device order, row-major, as parallel.make_mesh lays devices."""
    import numpy as np

    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?",
                      attrs):
        dims = [int(d) for d in m.group(3).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(p) for p in m.group(4).split(",")])
        return ids.reshape(int(m.group(1)), int(m.group(2)))[0].tolist()
    if m := re.search(r"replica_groups=\{\{([\d,]*)\}", attrs):
        return [int(d) for d in m.group(1).split(",")]
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attrs):
        sizes = [(a, int(n)) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))]
        named = set(re.findall(r"'(\w+)'", m.group(2)))
        ids = np.arange(math.prod(n for _, n in sizes)).reshape([n for _, n in sizes])
        return ids[tuple(slice(None) if a in named else 0 for a, _ in sizes)].ravel().tolist()
    return list(range(num_devices))  # {} = every device


def collective_bytes(hlo: str, num_devices: int) -> dict:
    """{op: {'count', 'payload', 'wire'}} per device per call of an optimized, SPMD-partitioned
    HLO module (`compiled.as_text()`); ops in a while body count known_trip_count times."""
    out = {op: {"count": 0, "payload": 0, "wire": 0.0} for op in COLLECTIVES}
    for r in collective_records(hlo, num_devices):
        for key in ("count", "payload", "wire"):
            out[r["op"]][key] += r[key]
    return out


def collective_records(hlo: str, num_devices: int) -> list[dict]:
    """One record per collective instruction that moves bytes: its op, how often it runs per
    call (count), payload and wire bytes per device over those runs, and its first replica
    group's device ids (which links it crosses is the target's question, plan/predict.py)."""
    computations, instructions, roots, entry = {}, {}, {}, None
    for line in hlo.splitlines():
        if m := _COMPUTATION.match(line):
            current = m.group(1)
            computations[current] = []
            entry = current if line.startswith("ENTRY") else entry
        elif computations and (m := _INSTRUCTION.match(line)):
            name, shape, op, rest = m.groups()
            instructions[name] = (shape, op, rest)
            computations[current].append(name)
            if line.lstrip().startswith("ROOT"):
                roots[current] = name

    def operands(rest):
        return re.findall(r"%([\w.-]+)", rest.split(")", 1)[0])

    def sent_bytes(name):
        # XLA:CPU has no bf16 collectives: it rounds the operand to bf16 and converts it to f32
        # (convert(convert(x)), often inside a fusion, maybe under a copy or bitcast), doubling
        # what a GPU or TPU sends. Count such an operand at the width the program asked for.
        shape, op, rest = instructions.get(name, ("", "", ""))
        if op == "fusion" and (m := _CALLEE.search(rest)) and m.group(1) in roots:
            _, op, rest = instructions[roots[m.group(1)]]
        while op in ("bitcast", "copy", "reshape", "transpose"):  # same elements
            _, op, rest = instructions.get(next(iter(operands(rest)), ""), ("", "", ""))
        inner = instructions.get(next(iter(operands(rest)), ""), ("", "", ""))
        if op == "convert" and inner[1] == "convert":
            return min(_shape_bytes(shape), _shape_bytes(inner[0]))
        return _shape_bytes(shape)

    # Computations are printed callees first, ENTRY last: walk backwards to give every
    # computation the number of times it runs per call before reaching what it calls.
    runs = dict.fromkeys(computations, 0)
    runs[entry] = 1
    for comp in reversed(computations):
        for name in computations[comp]:
            _, op, rest = instructions[name]
            trips = 1
            if op == "while":
                m = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                trips = int(m.group(1)) if m else 1  # unknown: counted once
            callees = _CALLEE.findall(rest)
            for branches in _BRANCHES.findall(rest):
                callees += re.findall(r"%([\w.-]+)", branches)
            for callee in callees:
                if callee in runs:
                    runs[callee] += runs[comp] * trips
    out = []
    for comp, names in computations.items():
        for name in names:
            _, op, rest = instructions[name]
            base = op.removesuffix("-start")
            if base not in COLLECTIVES or runs[comp] == 0:
                continue
            # Groups of one device move nothing (XLA:CPU keeps such all-reduces, over mesh
            # axes of size 1, as copies).
            if len(group := first_group(rest, num_devices)) == 1:
                continue
            payload = runs[comp] * sum(sent_bytes(o) for o in operands(rest))
            out.append({"op": base, "count": runs[comp], "payload": payload,
                        "wire": payload * WIRE[base](len(group)), "group": group})
    return out
