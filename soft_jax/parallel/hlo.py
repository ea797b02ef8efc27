"""What a compiled program moves between devices, read from its optimized HLO text.

Every collective (all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute) is attributed to the
code inside a while loop (paid at every iteration: a decode loop's token step) or outside any loop (paid once
per call), with the bytes of its result per device. A loop nested in a loop's body (the layers scanned inside
a decode step) runs its body its known trip count times per outer iteration, and its collectives count that
many times. An asynchronous collective is counted once, at its `-done`.
That is what `soft-jax plan` reports per program and what the tests read to prove, for example, that a decode
step gathers no parameter.
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# an HLO computation's header: `%name (params) -> result {` or `ENTRY %name ...{`
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
# an instruction: `%name = <shape> <op>(operands), attributes`
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_CALLEES = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation|"
                      r"called_computations|branch_computations)=\{?([^}\s]+(?:,\s*%[\w.\-]+)*)\}?")
_ARRAY = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8e4m3fn|f8e5m2|f8e4m3|f8e5m2fnuz|f8e4m3fnuz|bf16|"
                    r"f16|f32|f64|c64|c128)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8,
          "u64": 8, "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string: an array `f32[8,96]{1,0}` or a tuple of them."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        total += _BYTES.get(dtype, 1) * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def array_dims(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(dtype, dims)] of the arrays in an HLO shape string."""
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(shape)]


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of COLLECTIVES
    shape: str  # its result's HLO shape
    bytes: int  # per device
    in_loop: bool  # inside a while loop's body or condition
    computation: str
    name: str
    repeats: int = 1  # runs per iteration of the outermost loop around it (per call outside loops)


@dataclasses.dataclass(frozen=True)
class Traffic:
    """A program's collectives: the bytes each device receives per loop iteration and per call."""

    collectives: tuple[Collective, ...]

    @property
    def per_step(self) -> int:
        """Bytes per iteration of the outermost loop (a decode step), nested loops counted by their trip counts."""
        return sum(c.bytes * c.repeats for c in self.collectives if c.in_loop)

    @property
    def per_call(self) -> int:
        return sum(c.bytes * c.repeats for c in self.collectives if not c.in_loop)

    def in_loop(self, kind: str | None = None) -> list[Collective]:
        return [c for c in self.collectives if c.in_loop and (kind is None or c.kind == kind)]


_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_LOOP_PARTS = re.compile(r"(?:body|condition)=%?([\w.\-]+)")


def _computations(text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines; the entry computation's name is under the key None."""
    out: dict = {}
    current = None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and "=" not in line.split("(")[0]:
                current = m.group(1)
                out[current] = []
                if line.startswith("ENTRY"):
                    out[None] = current
        elif line.strip() == "}":
            current = None
        else:
            out[current].append(line)
    return out


def _callees(line: str) -> list[str]:
    names = []
    for group in _CALLEES.findall(line):
        names += [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
    return names


_CONSTANT = re.compile(r"^\s*%?([\w.\-]+)\s*=\s*s32\[\]\S*\s+constant\((\d+)\)")
_COMPARE_LT = re.compile(r"^\s*ROOT\s.*\scompare\(%?([\w.\-]+),\s*%?([\w.\-]+)\).*direction=LT")


def _trip_count(while_line: str, comps: dict) -> int | None:
    """A while loop's trip count: XLA's `known_trip_count` annotation (the CPU compiler's), else a condition
    `i < N` against a constant, as lax.scan lowers (counting from 0 by 1; the TPU compiler keeps no annotation)."""
    known = _TRIP_COUNT.search(while_line)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", while_line)
    lines = comps.get(cond.group(1), ()) if cond else ()
    constants = {m.group(1): int(m.group(2)) for m in map(_CONSTANT.match, lines) if m}
    for line in lines:
        m = _COMPARE_LT.match(line)
        if m and m.group(2) in constants:
            return constants[m.group(2)]
    return None


def _repeats(comps: dict, loops: set[str]) -> dict[str, int]:
    """How often each computation reached from the entry runs per iteration of the outermost loop around it (per
    call outside loops): a while loop inside a loop's body multiplies by its trip count (a loop whose trip count
    is not found counts once: a lower bound)."""
    reps: dict[str, int] = {}
    stack = [(comps[None], 1)] if None in comps else []
    while stack:
        name, times = stack.pop()
        if reps.get(name, 0) >= times:
            continue
        reps[name] = times
        for line in comps.get(name, ()):
            if " while(" in line:
                trip = _trip_count(line, comps) if name in loops else None
                inner = times * trip if trip else times if name in loops else 1
                stack += [(c, inner) for c in _LOOP_PARTS.findall(line)]
            else:
                stack += [(c, times) for c in _callees(line)]
    return reps


def traffic(hlo_text: str) -> Traffic:
    """The collectives of an optimized HLO module (`compiled.as_text()`), each marked in or out of a loop."""
    comps = _computations(hlo_text)
    calls = {name: [c for line in lines for c in _callees(line)] for name, lines in comps.items() if name}
    loops: set[str] = set()
    stack = []
    for name, lines in comps.items():
        for line in lines if name else ():
            if " while(" in line:
                stack += [c.lstrip("%") for c in _LOOP_PARTS.findall(line)]
    while stack:  # everything a loop's body or condition calls runs at every iteration too
        name = stack.pop()
        if name in loops:
            continue
        loops.add(name)
        stack += calls.get(name, [])
    reps = _repeats(comps, loops)
    found = []
    for comp, lines in comps.items():
        for line in lines if comp else ():
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            name, shape, op = m.group(1), m.group(2), m.group(3)
            kind = op[:-len("-done")] if op.endswith("-done") else op
            if kind not in COLLECTIVES:
                continue  # `-start` halves are counted at their `-done`
            found.append(Collective(kind, shape, shape_bytes(shape), comp in loops, comp, name, reps.get(comp, 1)))
    return Traffic(tuple(found))


def parameter_gathers(t: Traffic, param_shapes, in_loop: bool = True) -> list[Collective]:
    """The all-gathers whose result has the shape of a whole parameter (`param_shapes`, unit dimensions aside):
    inside loops only, or
    anywhere (`in_loop=False`: XLA may hoist a loop-invariant gather out of the loop, holding the gathered
    weights for the whole call instead)."""
    squeeze = lambda dims: tuple(d for d in dims if d != 1)  # TPU gathers a layer as [1, in, out]
    shapes = {squeeze(s) for s in param_shapes}
    return [c for c in t.collectives if (c.in_loop or not in_loop) and c.kind == "all-gather"
            and any(squeeze(dims) in shapes for _, dims in array_dims(c.shape))]


_DIMS = re.compile(r"(lhs_contracting_dims|dim_labels)=\{?([\w,>\-]*)\}?")


def _operands(line: str) -> list[str]:
    """The operand names of an instruction line (`op(%a, %b), ...` or `op(f32[..] %a, ...)`)."""
    args, depth, end = _INSTRUCTION.match(line).group(4), 1, 0
    while end < len(args):
        depth += (args[end] == "(") - (args[end] == ")")
        if depth == 0:
            break
        end += 1
    return [a.split()[-1].lstrip("%") for a in args[:end].split(",") if a.strip()]


def _matmul_flops(line: str, shapes: dict[str, str]) -> int:
    """2 x output elements x contracted size of a `dot` or `convolution` (a matmul as TPU HLO writes it)."""
    m = _INSTRUCTION.match(line)
    out = array_dims(m.group(2))
    lhs, rhs = (_operands(line) + [None, None])[:2]
    attrs = dict(_DIMS.findall(line))
    if not out or lhs not in shapes or rhs not in shapes:
        return 0
    size = math.prod(out[0][1])
    if m.group(3) == "dot":
        dims = array_dims(shapes[lhs])[0][1]
        contracted = [int(i) for i in attrs.get("lhs_contracting_dims", "").split(",") if i]
        return 2 * size * math.prod(dims[i] for i in contracted)
    window = re.search(r"window=\{size=([\dx]+)", line)
    if window and any(int(n) != 1 for n in window.group(1).split("x")):
        return 0  # a batched product TPU writes as a windowed convolution (attention's): not counted
    labels = attrs.get("dim_labels", "")  # e.g. b0f_0io->b0f: the kernel's (rhs) labels between "_" and "->"
    kernel = labels.split("_")[1].split("->")[0] if "_" in labels else ""
    dims = array_dims(shapes[rhs])[0][1]
    if len(kernel) != len(dims):
        return 0
    return 2 * size * math.prod(d for label, d in zip(kernel, dims) if label != "o")


def flops(hlo_text: str) -> tuple[int, bool]:
    """The matmul FLOPs of one call of an optimized HLO module (dots, and convolutions that are matmuls; elementwise
    work is not counted, nor the batched products TPU HLO writes as windowed convolutions: attention's scores and
    values, a few percent of a 7B layer's work at 1,024 tokens, so the count is a lower bound there), every while
    loop's body counted its trip count times, the outermost loops' included. Returns (flops,
    exact): exact is False when some loop's trip count is unknown (a decode loop, run until its rows stop): each
    such loop counts once, so the figure is then per iteration of it."""
    comps = _computations(hlo_text)
    runs: dict[str, int] = {}
    exact = True
    stack = [(comps[None], 1)] if None in comps else []
    while stack:
        name, times = stack.pop()
        runs[name] = runs.get(name, 0) + times
        for line in comps.get(name, ()):
            if " while(" in line:
                trip = _trip_count(line, comps)
                exact &= trip is not None
                body = re.search(r"body=%?([\w.\-]+)", line)
                if body:
                    stack.append((body.group(1), times * (trip or 1)))
            else:
                stack += [(c, times) for c in _callees(line)]
    total = 0
    for name, times in runs.items():
        lines = comps.get(name, ())
        shapes = {m.group(1): m.group(2) for m in map(_INSTRUCTION.match, lines) if m}
        total += times * sum(_matmul_flops(line, shapes) for line in lines
                             if " dot(" in line or " convolution(" in line)
    return total, exact
