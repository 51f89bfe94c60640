"""What a compiled step costs, read from its programs: matmul FLOPs with loop trips counted, the collectives of one
step by kind and its HBM traffic, and a roofline estimate of step time and MFU from a chip's datasheet figures.

XLA's `cost_analysis()` counts the body of a while loop once, so a model whose layers are scanned reports about one
layer's FLOPs. `dot_flops` reads the lowered (StableHLO) program instead, multiplying what each loop body does by the
loop's trip count; `read_hlo` reads the optimized (per-device) HLO the same way.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterable

from llm_jax.tpu import Chip

COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_MLIR_FUNC = re.compile(r"^\s*func\.func (?:public |private )?@([\w.$-]+)\(")
_MLIR_CALL = re.compile(r"\bcall @([\w.$-]+)\(")
_MLIR_DOT = re.compile(r"stablehlo\.dot_general .*contracting_dims = \[([\d, ]*)\] x .*: "
                       r"\(tensor<([^>]*)>, tensor<[^>]*>\) -> tensor<([^>]*)>")
_MLIR_I32_CONST = re.compile(r"stablehlo\.constant dense<(\d+)> : tensor<i32>")


def _dims(mlir_type: str) -> list[int]:
  """'8x64x512xf32' -> [8, 64, 512]."""
  return [int(p) for p in mlir_type.split("x")[:-1]]


def _braces(line: str) -> int:
  line = re.sub(r'"[^"]*"', "", line)  # string attributes may hold braces
  return line.count("{") - line.count("}")


def _walk(lines: Iterable[str], trip_count: bool, is_loop, loop_bound, own_cost, callees):
  """Per-function (own cost, [(callee, multiplier)]) of a program whose loops nest by braces.

  `is_loop(line)` opens a loop whose condition region comes first; `loop_bound(line)` is a trip-count candidate seen in
  it; the `} do {` line starts the body. Lines in a body count `trip` times (times the enclosing bodies' trips).
  """
  functions: dict[str, tuple[float, list[tuple[str, float]]]] = {}
  name, depth, frames = None, 0, []  # frames: [start depth, trip, in body]
  for line in lines:
    start = _MLIR_FUNC.match(line)
    if start:
      name, depth, frames = start[1], 0, []
      functions[name] = (0.0, [])
    if name is None:
      continue
    if frames and not frames[-1][2]:
      bound = loop_bound(line)
      if bound is not None:
        frames[-1][1] = max(frames[-1][1], bound)
      if "} do {" in line:
        frames[-1][2] = True
    multiplier = math.prod(f[1] if trip_count else 1 for f in frames if f[2])
    cost, calls = functions[name]
    functions[name] = (cost + multiplier * own_cost(line), calls + [(c, multiplier) for c in callees(line)])
    if is_loop(line):
      frames.append([depth, 1, False])
    depth += _braces(line)
    while frames and frames[-1][2] and depth <= frames[-1][0]:
      frames.pop()
  return functions


def _dot_line_flops(line: str) -> float:
  match = _MLIR_DOT.search(line)
  if not match:
    return 0.0
  contracting = [int(i) for i in match[1].replace(" ", "").split(",") if i]
  lhs, out = _dims(match[2]), _dims(match[3])
  return 2.0 * math.prod(out) * math.prod(lhs[i] for i in contracting)


def dot_flops(lowered_text: str, trip_count: bool = True) -> float:
  """Matmul FLOPs of one call of a lowered (StableHLO) program, for all devices together: 2·M·N·K per dot_general,
  times the trip count of each loop around it (or once each, with `trip_count=False`, as XLA's cost analysis counts)."""
  functions = _walk(
      lowered_text.splitlines(), trip_count,
      is_loop=lambda line: "stablehlo.while(" in line,
      loop_bound=lambda line: int(m[1]) if (m := _MLIR_I32_CONST.search(line)) else None,
      own_cost=_dot_line_flops,
      callees=lambda line: _MLIR_CALL.findall(line))
  memo: dict[str, float] = {}

  def total(fn: str) -> float:
    if fn not in memo:
      own, calls = functions.get(fn, (0.0, []))
      memo[fn] = own + sum(m * total(c) for c, m in calls)
    return memo[fn]

  return total("main")


# ---- the optimized (per-device) HLO: computations, the calls between them, and loop trip counts ----

_HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?(%[\w.-]+) ")
_HLO_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?(%[\w.-]+) = (.*?) ([a-z][a-z0-9-]*)\(")
_HLO_REFS = re.compile(r"\b(calls|to_apply|body|condition)=(%[\w.-]+)")
_HLO_REF_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_HLO_S32_CONST = re.compile(r"= s32\[\][^ ]* constant\((\d+)\)")
_HLO_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64|c64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8}


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str
  count: int  # executions per step (loop trips counted)
  bytes: float  # result bytes per device, summed over executions
  moved_bytes: float  # bytes each device sends over the links, ring algorithms, summed over executions


def _shape_bytes(shape_text: str) -> int:
  return sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in _HLO_SHAPE.findall(shape_text))


def _group_size(line: str, num_devices: int) -> int:
  """Devices in each replica group of a collective, from any of the HLO spellings of replica_groups."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
  if mesh:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", mesh[1]))
    return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", mesh[2]))
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
  if iota:
    return int(iota[2])
  explicit = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
  if explicit:
    return len(explicit[1].split(","))
  return num_devices


def _moved(kind: str, result_bytes: int, n: int) -> float:
  """Bytes one device sends in a ring implementation of the collective over n devices."""
  if n <= 1:
    return 0.0
  return {"all-gather": result_bytes * (n - 1) / n, "reduce-scatter": result_bytes * (n - 1),
          "all-reduce": 2 * result_bytes * (n - 1) / n, "all-to-all": result_bytes * (n - 1) / n,
          "collective-permute": float(result_bytes)}[kind]


# Instructions that move no data of their own through HBM (structure, aliases, the halves of async pairs whose start
# is counted, and wrappers whose wrapped computation is counted instead).
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "opt-barrier", "async-start", "async-update", "async-done"}


@dataclasses.dataclass(frozen=True)
class HloCost:
  """What one step of an optimized HLO module does per device, loop trips counted."""

  collectives: dict[str, Collective]
  hbm_bytes: float  # operands and results of every unfused instruction and fusion: an HBM traffic estimate


def _fusion_reads(fused_lines: list[str]) -> tuple[dict[int, int], int | None]:
  """What a fused computation really touches of its operands: {parameter number: bytes read} for parameters it only
  dynamic-slices (the slices) or updates in place (nothing), and the bytes it writes when its root is an in-place
  dynamic-update-slice (the update), else None."""
  params, shapes, uses, written = {}, {}, {}, None
  for line in fused_lines:
    inst = _HLO_INSTRUCTION.match(line)
    if not inst:
      continue
    shapes[inst[1]] = inst[2]
    if inst[3] == "parameter":
      params[inst[1]] = int(re.search(r"parameter\((\d+)\)", line)[1])
      continue
    operands = re.findall(r"%[\w.-]+", line[inst.end():].split(")", 1)[0])
    for i, o in enumerate(operands):
      if o in params:
        sliced = inst[3] == "dynamic-slice" and i == 0
        in_place = inst[3] == "dynamic-update-slice" and i == 0
        uses.setdefault(o, []).append(_shape_bytes(inst[2]) if sliced else 0 if in_place else None)
    if line.lstrip().startswith("ROOT") and inst[3] == "dynamic-update-slice" and len(operands) > 1:
      written = _shape_bytes(shapes.get(operands[1], ""))
  reads = {params[p]: sum(u) for p, u in uses.items() if None not in u}
  return reads, written


def _traffic(opcode: str, result: str, operands: list[str], fused_lines: list[str] | None) -> float:
  """HBM bytes one unfused instruction or fusion reads and writes: its operands and result, except what slicing and
  in-place updates leave untouched."""
  sizes = [_shape_bytes(o) for o in operands]
  if opcode == "dynamic-slice":
    return 2.0 * _shape_bytes(result)
  if opcode == "dynamic-update-slice":
    return 2.0 * (sizes[1] if len(sizes) > 1 else 0)
  if fused_lines is None:
    return float(_shape_bytes(result) + sum(sizes))
  reads, written = _fusion_reads(fused_lines)
  return float((_shape_bytes(result) if written is None else written)
               + sum(reads.get(i, size) for i, size in enumerate(sizes)))


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    header = _HLO_COMPUTATION.match(line)
    if header and line.rstrip().endswith("{"):
      current = header[1]
      comps[current] = []
      entry = current if line.startswith("ENTRY") else entry
    elif current is not None:
      comps[current].append(line)
  return comps, entry


def read_hlo(hlo_text: str, num_devices: int) -> HloCost:
  """The collectives (by kind: count, result bytes, bytes sent) and the HBM traffic of one step of an optimized HLO
  module, per device; each loop body counts once per trip, and computations not reachable from ENTRY not at all.
  A fusion's traffic is its operands and result (what it reads and writes in HBM), not what happens inside."""
  comps, entry = _computations(hlo_text)
  trips = {name: max([int(c) for line in body for c in _HLO_S32_CONST.findall(line)] or [1])
           for name, body in comps.items()}
  found: dict[str, list[float]] = {k: [0, 0.0, 0.0] for k in COLLECTIVE_KINDS}
  traffic = [0.0]

  def visit(name: str, multiplier: float, fused: bool, stack: tuple[str, ...]) -> None:
    shapes: dict[str, str] = {}
    for line in comps.get(name, ()):
      inst = _HLO_INSTRUCTION.match(line)
      opcode = inst[3] if inst else ""
      if inst:
        shapes[inst[1]] = inst[2]
        kind = opcode.removesuffix("-start")
        if kind in found and not opcode.endswith("-done"):
          size = _shape_bytes(inst[2])
          found[kind][0] += multiplier
          found[kind][1] += multiplier * size
          found[kind][2] += multiplier * _moved(kind, size, _group_size(line, num_devices))
        if not fused and opcode not in _NO_TRAFFIC and not opcode.endswith("-done"):
          operands = [shapes.get(o, "") for o in re.findall(r"%[\w.-]+", line[inst.end():].split(")", 1)[0])]
          called = re.search(r"\bcalls=(%[\w.-]+)", line) if opcode == "fusion" else None
          traffic[0] += multiplier * _traffic(opcode, inst[2], operands, comps.get(called[1], []) if called else None)
      condition = re.search(r"\bcondition=(%[\w.-]+)", line)
      trip = trips[condition[1]] if condition else 1
      refs = [(ref, trip if role == "body" else 1, role == "to_apply" or opcode == "fusion")
              for role, ref in _HLO_REFS.findall(line)]
      refs += [(ref.strip(), 1, fused) for group in _HLO_REF_LISTS.findall(line) for ref in group.split(",")
               if ref.strip()]
      for ref, trip, inner_fused in refs:
        if ref not in stack:
          visit(ref, multiplier * trip, fused or inner_fused, stack + (ref,))

  if entry is not None:
    visit(entry, 1, False, (entry,))
  return HloCost({k: Collective(k, int(c), b, m) for k, (c, b, m) in found.items() if c}, traffic[0])


def collectives(hlo_text: str, num_devices: int) -> dict[str, Collective]:
  """`read_hlo(...).collectives`: the collectives of one step, by kind."""
  return read_hlo(hlo_text, num_devices).collectives


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A roofline estimate of one step on one chip: each term the time its resource alone would take."""

  compute_s: float
  hbm_s: float
  ici_s: float
  dcn_s: float | None  # None: one slice, or a chip without a DCN datasheet figure

  @property
  def terms(self) -> dict[str, float]:
    t = {"compute": self.compute_s, "HBM": self.hbm_s, "ICI collectives": self.ici_s}
    if self.dcn_s is not None:
      t["DCN collectives"] = self.dcn_s
    return t

  @property
  def step_s(self) -> float:
    """The largest term: perfect overlap of the others, so a lower bound on the real step time."""
    return max(self.terms.values())

  @property
  def bound(self) -> str:
    return max(self.terms, key=self.terms.get)


def estimate(chip: Chip, flops_per_chip: float, hbm_bytes_per_chip: float, ici_moved_bytes: float,
             dcn_moved_bytes: float | None = None) -> Estimate:
  """Step time terms from the chip's bf16 peak, HBM bandwidth and one ICI link pair per collective (a ring along one
  torus dimension, both directions); DCN at the chip's share of the hosts' network."""
  dcn = None
  if dcn_moved_bytes is not None and chip.dcn_bytes_per_s:
    dcn = dcn_moved_bytes / chip.dcn_bytes_per_s
  return Estimate(compute_s=flops_per_chip / chip.peak_bf16_flops, hbm_s=hbm_bytes_per_chip / chip.hbm_bytes_per_s,
                  ici_s=ici_moved_bytes / chip.ici_axis_bytes_per_s, dcn_s=dcn)


def mfu(model_flops_per_step: float, chips: int, chip: Chip, step_s: float) -> float:
  """Model FLOPs (no recomputation) over what the chips could do in `step_s` at their bf16 peak."""
  return model_flops_per_step / (chips * chip.peak_bf16_flops * step_s)
