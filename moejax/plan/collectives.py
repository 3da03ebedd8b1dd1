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


def _group_size(attrs: str, num_devices: int) -> int:
    if m := re.search(r"replica_groups=\[\d+,(\d+)\]<=", attrs):  # iota form [groups,size]<=..
        return int(m.group(1))
    if m := re.search(r"replica_groups=\{\{([\d,]*)\}", attrs):
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attrs):
        # mesh['axis_0'=1,'axis_1'=8] {'axis_1'}: a group spans the named axes
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
    return num_devices  # {} = every device


def collective_bytes(hlo: str, num_devices: int) -> dict:
    """{op: {'count', 'payload', 'wire'}} per device per call of an optimized, SPMD-partitioned
    HLO module (`compiled.as_text()`); ops in a while body count known_trip_count times."""
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
    out = {op: {"count": 0, "payload": 0, "wire": 0.0} for op in COLLECTIVES}
    for comp, names in computations.items():
        for name in names:
            _, op, rest = instructions[name]
            base = op.removesuffix("-start")
            if base not in out or runs[comp] == 0:
                continue
            # Groups of one device move nothing (XLA:CPU keeps such all-reduces, over mesh
            # axes of size 1, as copies).
            if (group := _group_size(rest, num_devices)) == 1:
                continue
            payload = runs[comp] * sum(sent_bytes(o) for o in operands(rest))
            out[base]["count"] += runs[comp]
            out[base]["payload"] += payload
            out[base]["wire"] += payload * WIRE[base](group)
    return out
