"""Cloud TPU slices by their gcloud names: the chip datasheet table, slice shapes, and compile-only devices from libtpu.

A slice named as gcloud names accelerator types (`v4-8`, `v5litepod-16` or `v5e-16`, `v5p-128`, `v6e-8`) becomes the
devices libtpu describes for that topology, on any machine: a mesh over them compiles the real step for the slice
without one (`llm_jax.dryrun`). v4 and v5p names count TensorCores (two per chip, run as one "megacore" device), v5e
and v6e names count chips.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Sequence

import jax

from llm_jax import errors

LIBTPU_PIN = "libtpu==0.0.42.*"  # what jax[tpu]==0.10.2 pins (setup.cfg's `tpu` extra)


class TopologyError(errors.ConfigError):
  """A slice name, slice count or mesh that cannot describe a TPU slice; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's datasheet figures per chip.

  ICI bandwidth is bidirectional, all ports together, as the datasheets give it; a ring collective along one mesh axis
  uses one port in each direction, `ici_axis_bytes_per_s`.
  """

  generation: str
  device_kind: str  # what jax reports for its devices
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bytes_per_s: float
  ici_bytes_per_s: float  # bidirectional, per chip, all ports
  ici_ports: int
  dcn_bytes_per_s: float | None  # data-center network per chip (between slices); None where no datasheet gives it
  cores_per_chip: int  # TensorCores: what v4/v5p slice names count
  torus_dims: int
  source: str

  @property
  def ici_axis_bytes_per_s(self) -> float:
    """Both directions of one ICI link: what a ring collective along one torus dimension moves per second."""
    return self.ici_bytes_per_s / self.ici_ports


GIB = 1024**3
CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GIB, 275e12, 1200e9, 6 * 2 * 50e9, 6, None, 2, 3,
               "docs.cloud.google.com/tpu/docs/v4 (275 TFLOPs, 32 GiB, 1200 GBps); ICI: 6 links of 50 GB/s each way, "
               "Jouppi et al., ISCA 2023 (TPU v4 paper)"),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GIB, 197e12, 819e9, 400e9, 4, 2 * 100e9 / 8 / 8, 1, 2,
                "docs.cloud.google.com/tpu/docs/v5e (197 TFLOPs, 16 GB, 819 GBps, ICI 400 GBps bidirectional, "
                "4 ports; DCN 2 x 100 Gbps NIC per 8-chip host)"),
    "v5p": Chip("v5p", "TPU v5", 95 * GIB, 459e12, 2765e9, 1200e9, 6, 50e9 / 8, 2, 3,
                "docs.cloud.google.com/tpu/docs/v5p (459 TFLOPs, 95 GiB, 2765 GBps, ICI 1200 GBps bidirectional, "
                "3D torus; DCN 50 Gbps per chip)"),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GIB, 918e12, 1638e9, 800e9, 4, None, 1, 2,
                "docs.cloud.google.com/tpu/docs/v6e (918 TFLOPs, 32 GB, 1638 GBps, ICI 800 GBps bidirectional, "
                "4 ports)"),
}
_ALIASES = {"v5litepod": "v5e"}
# The single-slice sizes gcloud offers, in chips (v5e/v6e: 2D torus shapes; v4/v5p: 3D, any power of two from 4).
_SIZES_2D = (1, 4, 8, 16, 32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class Slice:
  """One slice (or `num_slices` identical ones joined by the data-center network)."""

  name: str
  chip: Chip
  chips: int  # per slice
  shape: tuple[int, ...]  # the torus, e.g. (4, 4, 4)
  num_slices: int = 1

  @property
  def topology(self) -> str:
    """libtpu's name for one slice, e.g. 'v5p:4x4x4'."""
    return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

  @property
  def total_chips(self) -> int:
    return self.chips * self.num_slices


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The default torus of a slice of `chips` chips: doubling the smallest axis (the last of equals) from 1x1 (2D)
  or 2x2x1 (3D), which gives gcloud's shapes: 2x4, 4x4, 8x16, 16x16; 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8."""
  shape = [1, 1] if dims == 2 else [2, 2, 1]
  while math.prod(shape) < chips:
    smallest = min(shape)
    last = max(i for i, s in enumerate(shape) if s == smallest)
    shape[last] *= 2
  return tuple(shape)


def parse_slice(name: str, num_slices: int = 1) -> Slice:
  """The slice a gcloud accelerator type names ('v5p-128': 64 chips, 4x4x4), `num_slices` of them."""
  known = ", ".join(sorted(CHIPS)) + ", v5litepod"
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
  if not match:
    raise TopologyError(f"topology={name!r} is not a TPU accelerator type; pass --config.topology=<generation>-<size> "
                        f"as gcloud names them, e.g. v5e-8, v5p-128 (generations: {known})")
  generation, count = _ALIASES.get(match[1], match[1]), int(match[2])
  if generation not in CHIPS:
    raise TopologyError(f"topology={name!r}: unknown TPU generation {match[1]!r}; pass one of {known}")
  chip = CHIPS[generation]
  if count % chip.cores_per_chip:
    raise TopologyError(f"topology={name!r}: {generation} names count TensorCores, {chip.cores_per_chip} per chip; "
                        f"pass a multiple of {chip.cores_per_chip}, e.g. {generation}-8")
  chips = count // chip.cores_per_chip
  sizes_ok = chips in _SIZES_2D if chip.torus_dims == 2 else chips >= 4 and chips & (chips - 1) == 0
  if not sizes_ok:
    offered = ", ".join(f"{generation}-{n * chip.cores_per_chip}" for n in
                        (_SIZES_2D if chip.torus_dims == 2 else (4, 8, 16, 32, 64, 128)))
    raise TopologyError(f"topology={name!r} is not a single-slice size of {generation} ({chips} chips); pass one "
                        f"of {offered}{', ...' if chip.torus_dims == 3 else ''}")
  if num_slices < 1:
    raise TopologyError(f"num_slices={num_slices} must be at least 1")
  return Slice(name=name, chip=chip, chips=chips, shape=torus_shape(chips, chip.torus_dims), num_slices=num_slices)


def chip_for_kind(device_kind: str) -> Chip | None:
  """The datasheet row of a device kind as jax reports it ('TPU v5 lite'), or None for other devices."""
  return next((c for c in CHIPS.values() if c.device_kind.lower() == device_kind.lower()), None)


def check_libtpu(asked_by: str = "compiling for a TPU topology") -> None:
  """Refuses, in one line naming what asked for it (`asked_by`: a setting), a topology compile where libtpu (the TPU
  compiler) is not installed."""
  if importlib.util.find_spec("libtpu") is None:
    raise TopologyError(f"{asked_by} needs libtpu, the TPU compiler, which is not installed: pip install -e .[tpu] "
                        f"(installs {LIBTPU_PIN}, the version jax[tpu] pins)")


def devices(slice_: Slice) -> list[jax.Device]:
  """Compile-only devices of the slice(s), through libtpu: a mesh over them compiles for the slice on any machine.

  Off a TPU host, libtpu is told not to look for a TPU metadata server and to share its lock with other processes
  compiling at the same time (set in the environment unless already set).
  """
  check_libtpu()
  if jax.default_backend() != "tpu":
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel  # only with libtpu

  kwargs = {"num_slices": slice_.num_slices} if slice_.num_slices > 1 else {}
  if slice_.chip.cores_per_chip > 1:
    kwargs["chip_config_name"] = "megacore"  # one device per chip, as jax runs v4 and v5p
  return list(topologies.get_topology_desc(topology_name=slice_.topology, platform="tpu", **kwargs).devices)


def slices_of(devices_: Sequence[jax.Device]) -> int:
  """How many slices the devices span (1 for devices without a slice index: CPU, GPU, one TPU slice)."""
  return len({getattr(d, "slice_index", 0) for d in devices_})
