"""Device catalog: memory, peak FLOP/s per precision, and memory and link bandwidth of each device.

    spec = get_device("H100")                # canonical names, aliases and vendor names resolve
    spec.name, spec.memory_bytes             # ('h100-sxm', 85899345920)
    spec.flops_for(torch.bfloat16)           # 9.895e14: dense peak, no structured sparsity
    get_device("NVIDIA GeForce RTX 4090")    # what torch.cuda.get_device_name() returns
    get_device("cpu")                        # this host's CPU, measured once per process

GPU figures come from ``catalog.toml`` beside this file; every entry names the datasheet it
quotes. Add devices with :func:`register_device` or :func:`load_devices` (a TOML file in the
catalog's format).

Conventions used by every figure here:

- Peak FLOP/s are dense (no 2:4 structured sparsity): half of NVIDIA's "with sparsity" numbers.
- Link bandwidths are per direction: what a device can send while it receives as much at the same
  time, i.e. half of a "bidirectional" datasheet figure (H100 SXM NVLink "900 GB/s" -> 450e9).
- Memory bandwidth counts bytes read plus bytes written per second.
"""

from __future__ import annotations

import difflib
import functools
import importlib.resources
import logging
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

logger = logging.getLogger(__name__)

PRECISIONS = ("fp64", "fp32", "tf32", "bf16", "fp16", "fp8", "int8")
"""Keys of :attr:`DeviceSpec.peak_flops`, widest first."""

KINDS = ("gpu", "cpu")

PCIE_X16_BYTES_PER_S = {1: 4.0e9, 2: 8.0e9, 3: 15.75e9, 4: 31.5e9, 5: 63.0e9, 6: 121.0e9}
"""Raw data rate of an x16 PCIe link per direction, by generation (PCI-SIG base specifications):
16 lanes x 2.5/5 GT/s with 8b/10b encoding (gen1/2), 8/16/32 GT/s with 128b/130b (gen3/4/5),
64 GT/s with 242/256 FLIT efficiency (gen6). Copies measured over a link reach ~80-90% of it."""

DEFAULT_KERNEL_OVERHEAD_S = 5e-6
"""Per-kernel launch overhead assumed when none is given: the usual few microseconds of an eager
PyTorch op on a GPU (launch plus framework dispatch)."""

CPU_DEFAULT_FLOPS = 1e11
"""fp32 and bf16 FLOP/s assumed for an uncalibrated CPU: a conservative figure for a few cores
with AVX2 (a current 8-core desktop reaches several times more)."""

CPU_DEFAULT_MEMORY_BANDWIDTH_BYTES_PER_S = 1e10
"""Host memory bandwidth assumed for an uncalibrated CPU: conservative, one DDR4 channel is ~25e9."""

CPU_FALLBACK_MEMORY_BYTES = 16 * 2**30
"""Host RAM assumed where the OS does not report it (no ``os.sysconf``)."""

CPU_PCIE_GENERATION = 5
"""The host side of a GPU's PCIe link: assumed able to match the GPU (the GPU's generation then
decides the link). Register a ``"cpu"`` DeviceSpec with a lower generation for an older host."""

_CALIBRATION_MATMUL_SIZE = 1024
_CALIBRATION_RUN_S = 0.2
"""The longest one calibration matmul may take: larger sizes are not tried beyond it."""
_CALIBRATION_COPY_BYTES = 128 * 2**20  # larger than the last-level cache of most hosts
_CALIBRATION_BUDGET_S = 0.12  # per measurement, after one warm-up run

_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")


@dataclass(frozen=True)
class DeviceSpec:
    """What the cost models need to know of one device.

    Example:
        >>> spec = DeviceSpec("my-gpu", memory_bytes=24 * 2**30, peak_flops={"fp32": 40e12, "bf16": 160e12},
        ...                   memory_bandwidth_bytes_per_s=1e12, pcie_generation=4)
        >>> spec.flops_for(torch.bfloat16), spec.pcie_bandwidth_bytes_per_s
        (160000000000000.0, 31500000000.0)
    """

    name: str
    """Canonical id, lowercase, e.g. ``"h100-sxm"``."""
    memory_bytes: int
    """Memory capacity, e.g. ``80 * 2**30``."""
    peak_flops: Mapping[str, float]
    """Dense peak FLOP/s (OP/s for int8) by precision key (see :data:`PRECISIONS`); only the
    precisions the device has. Read-only by convention: build a new spec to change a figure."""
    memory_bandwidth_bytes_per_s: float
    """Peak memory bandwidth, bytes read plus bytes written per second."""
    kind: str = "gpu"
    """``"gpu"`` or ``"cpu"``."""
    vendor_name: str = ""
    """What ``torch.cuda.get_device_name`` returns, e.g. ``"NVIDIA H100 80GB HBM3"``."""
    aliases: tuple[str, ...] = ()
    """Other names :func:`get_device` accepts, e.g. ``("h100",)``."""
    nvlink_generation: int | None = None
    """NVLink generation; ``None`` when the device reaches the others of its host without NVLink."""
    nvlink_bandwidth_bytes_per_s: float = 0.0
    """NVLink bandwidth per direction, all links of the device together (0: no NVLink)."""
    pcie_generation: int = 4
    """PCIe generation of the device's x16 host link."""
    pcie_bandwidth_bytes_per_s: float = 0.0
    """PCIe bandwidth per direction; 0 (the default) takes the x16 rate of ``pcie_generation``."""
    kernel_overhead_s: float = DEFAULT_KERNEL_OVERHEAD_S
    """Fixed time of every kernel launch (an assumption, see :data:`DEFAULT_KERNEL_OVERHEAD_S`)."""
    source: str = ""
    """Where the figures come from: datasheets, or how they were measured."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_PATTERN.fullmatch(self.name):
            raise ValueError(
                "name must be a lowercase id of letters, digits, '.', '-' or '_', e.g. 'h100-sxm';"
                f" got {self.name!r}"
            )
        if not _is_int(self.memory_bytes) or self.memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be a positive int, e.g. 80 * 2**30; got {self.memory_bytes!r}")
        object.__setattr__(self, "peak_flops", _checked_flops(self.peak_flops))
        _check_positive("memory_bandwidth_bytes_per_s", self.memory_bandwidth_bytes_per_s, "3.35e12")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, e.g. 'gpu'; got {self.kind!r}")
        if not isinstance(self.vendor_name, str) or not isinstance(self.source, str):
            raise TypeError("vendor_name and source must be str, e.g. vendor_name='NVIDIA H100 80GB HBM3'")
        aliases = (self.aliases,) if isinstance(self.aliases, str) else tuple(self.aliases)
        if not all(isinstance(a, str) and a.strip() for a in aliases):
            raise ValueError(f"aliases must be non-empty strings, e.g. ('h100', 'h100-sxm5'); got {self.aliases!r}")
        object.__setattr__(self, "aliases", aliases)
        self._check_links()
        _check_non_negative("kernel_overhead_s", self.kernel_overhead_s, "5e-6")

    def _check_links(self) -> None:
        generation, nvlink = self.nvlink_generation, self.nvlink_bandwidth_bytes_per_s
        if generation is not None and (not _is_int(generation) or generation < 1):
            raise ValueError(f"nvlink_generation must be None or an int >= 1, e.g. 4; got {generation!r}")
        _check_non_negative("nvlink_bandwidth_bytes_per_s", nvlink, "450e9 (H100 SXM, per direction)")
        if (generation is None) != (nvlink == 0):
            raise ValueError(
                "nvlink_generation and nvlink_bandwidth_bytes_per_s go together, e.g. nvlink_generation=4,"
                f" nvlink_bandwidth_bytes_per_s=450e9, or neither; got {generation!r} and {nvlink!r}"
            )
        if self.pcie_generation not in PCIE_X16_BYTES_PER_S:
            raise ValueError(
                f"pcie_generation must be one of {sorted(PCIE_X16_BYTES_PER_S)}, e.g. 4; got {self.pcie_generation!r}"
            )
        _check_non_negative("pcie_bandwidth_bytes_per_s", self.pcie_bandwidth_bytes_per_s, "31.5e9 (gen4 x16)")
        if self.pcie_bandwidth_bytes_per_s == 0:
            object.__setattr__(self, "pcie_bandwidth_bytes_per_s", PCIE_X16_BYTES_PER_S[self.pcie_generation])

    def __hash__(self) -> int:
        return hash((self.name, self.memory_bytes, tuple(self.peak_flops.items()), self.memory_bandwidth_bytes_per_s))

    @property
    def has_nvlink(self) -> bool:
        return self.nvlink_bandwidth_bytes_per_s > 0

    def flops_for(self, dtype: torch.dtype | str) -> float:
        """Dense peak FLOP/s for matmuls in ``dtype``.

        Args:
            dtype: a torch dtype (``torch.float32`` maps to ``"fp32"``: pass ``"tf32"`` when TF32
                matmuls are on) or a precision key such as ``"bf16"``.

        Raises:
            ValueError: the device has no figure for that precision; the message lists those it has.

        Example:
            >>> get_device("a100").flops_for(torch.bfloat16)
            312000000000000.0
        """
        key = precision_key(dtype)
        try:
            return self.peak_flops[key]
        except KeyError:
            raise ValueError(
                f"{self.name} has no peak FLOP/s for {_dtype_label(dtype)} (precision {key!r}); it has"
                f" {', '.join(self.peak_flops)}: compute in one of those, or give the figure in a"
                f" DeviceSpec (peak_flops={{{key!r}: ...}})"
            ) from None


def precision_key(dtype: torch.dtype | str) -> str:
    """The :data:`PRECISIONS` key of a torch dtype or dtype name.

    Example:
        >>> precision_key(torch.bfloat16), precision_key("float8_e4m3fn"), precision_key("tf32")
        ('bf16', 'fp8', 'tf32')
    """
    if isinstance(dtype, str):
        name = dtype.strip().lower()
        if name in PRECISIONS:
            return name
        candidate = getattr(torch, name.removeprefix("torch."), None)
        if not isinstance(candidate, torch.dtype):
            raise ValueError(f"unknown precision {dtype!r}; use a torch dtype or one of {', '.join(PRECISIONS)}")
        dtype = candidate
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or a precision key such as 'bf16'; got {dtype!r}")
    if dtype in _DTYPE_PRECISIONS:
        return _DTYPE_PRECISIONS[dtype]
    if dtype.is_floating_point and dtype.itemsize == 1:
        return "fp8"  # every float8 variant (e4m3fn, e5m2, the fnuz forms, ...)
    raise ValueError(
        f"no peak FLOP/s precision for {dtype}; matmul precisions are {', '.join(PRECISIONS)}"
        " (torch.float64/float32/bfloat16/float16, float8 dtypes, int8)"
    )


_DTYPE_PRECISIONS = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int8: "int8",
}


def _dtype_label(dtype: torch.dtype | str) -> str:
    return str(dtype) if isinstance(dtype, torch.dtype) else repr(dtype)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive(field_name: str, value: Any, example: str) -> None:
    if not _is_number(value) or value <= 0:
        raise ValueError(f"{field_name} must be a positive number, e.g. {example}; got {value!r}")


def _check_non_negative(field_name: str, value: Any, example: str) -> None:
    if not _is_number(value) or value < 0:
        raise ValueError(f"{field_name} must be a number >= 0, e.g. {example}; got {value!r}")


def _checked_flops(peak_flops: Any) -> dict[str, float]:
    if not isinstance(peak_flops, Mapping) or not peak_flops:
        raise ValueError(
            "peak_flops must be a non-empty mapping of precision to dense FLOP/s,"
            f" e.g. {{'fp32': 67e12, 'bf16': 989.5e12}}; got {peak_flops!r}"
        )
    unknown = [k for k in peak_flops if k not in PRECISIONS]
    if unknown:
        raise ValueError(
            f"peak_flops has unknown precision {unknown[0]!r}; keys are among {', '.join(PRECISIONS)},"
            " e.g. {'bf16': 989.5e12}"
        )
    for key, value in peak_flops.items():
        _check_positive(f"peak_flops[{key!r}]", value, "989.5e12")
    return {key: float(peak_flops[key]) for key in PRECISIONS if key in peak_flops}


# --------------------------------------------------------------------------- registry

_devices: dict[str, DeviceSpec] = {}
"""Registered devices by canonical name, the catalog's first."""
_index: dict[str, str] = {}
"""Normalised canonical names, aliases and vendor names -> canonical name."""
_catalog_loaded = False


def _normalise(name: str) -> str:
    """``"NVIDIA GeForce RTX 4090"``, ``"rtx_4090"`` and ``"RTX-4090"`` all give ``"rtx4090"``."""
    key = re.sub(r"[\s_-]+", "", name.lower())
    for prefix in ("nvidia", "geforce"):
        if key.startswith(prefix) and len(key) > len(prefix):
            key = key[len(prefix) :]
    return key


def _keys(spec: DeviceSpec) -> set[str]:
    return {_normalise(n) for n in (spec.name, spec.vendor_name, *spec.aliases) if n}


def _registry() -> dict[str, DeviceSpec]:
    global _catalog_loaded
    if not _catalog_loaded:
        text = importlib.resources.files(__package__).joinpath("catalog.toml").read_text(encoding="utf-8")
        for spec in _parse_devices(text, "cost_models/catalog.toml"):
            _add(spec, replace=False)
        _catalog_loaded = True
        logger.debug("loaded %d devices from the catalog", len(_devices))
    return _devices


def _add(spec: DeviceSpec, *, replace: bool) -> None:
    if spec.name in _devices and not replace:
        raise ValueError(
            f"device {spec.name!r} is already registered ({_devices[spec.name].vendor_name or 'no vendor name'}):"
            " pass replace=True to override it, or give the new device another name"
        )
    for key in sorted(_keys(spec)):
        owner = _index.get(key)
        if owner is not None and owner != spec.name:
            raise ValueError(
                f"device {spec.name!r}: the name {key!r} already means {owner!r}; drop it from the"
                " aliases or vendor_name, or register the device under another name"
            )
    old = _devices.get(spec.name)
    if old is not None:
        for key in _keys(old):
            _index.pop(key, None)
    _devices[spec.name] = spec
    _index.update(dict.fromkeys(_keys(spec), spec.name))


def register_device(spec: DeviceSpec, *, replace: bool = False) -> None:
    """Add a device to the catalog so :func:`get_device` and cluster strings know it.

    Registering a spec named ``"cpu"`` makes ``get_device("cpu")`` return it instead of this
    host's measured CPU, e.g. to plan for another machine's CPU.

    Args:
        spec: the device.
        replace: overwrite a registered device of the same name.

    Raises:
        ValueError: the name is taken (without ``replace``), or one of its aliases or its vendor
            name already means another device.

    Example:
        >>> register_device(DeviceSpec("rtx5090", memory_bytes=32 * 2**30, peak_flops={"bf16": 209.5e12},
        ...                             memory_bandwidth_bytes_per_s=1.79e12, pcie_generation=5))
        >>> get_device("RTX 5090").name
        'rtx5090'
    """
    if not isinstance(spec, DeviceSpec):
        raise TypeError(f"register_device takes a DeviceSpec; got {type(spec).__name__}")
    _registry()
    _add(spec, replace=replace)
    logger.debug("registered device %s", spec.name)


def list_devices() -> list[str]:
    """Canonical names of every known device, catalog order, then ``"cpu"``.

    Example:
        >>> list_devices()[:3]
        ['b200', 'h100-sxm', 'h100-pcie']
    """
    names = list(_registry())
    return names if "cpu" in names else names + ["cpu"]


def get_device(name: str) -> DeviceSpec:
    """The spec of a device by canonical name, alias or vendor name.

    Case, spaces, ``-`` and ``_`` do not matter, nor a leading "NVIDIA" or "GeForce":
    ``"H100"``, ``"h100_sxm"`` and ``"NVIDIA H100 80GB HBM3"`` all give ``h100-sxm``.
    ``"cpu"`` is this host's CPU, measured once per process (see :func:`cpu_device`) unless a
    device named ``"cpu"`` was registered.

    Raises:
        ValueError: unknown name; the message lists the closest known names and how to add one.

    Example:
        >>> get_device("rtx-4090").vendor_name
        'NVIDIA GeForce RTX 4090'
    """
    if not isinstance(name, str):
        raise TypeError(f"device name must be a str such as 'h100'; got {type(name).__name__}")
    if not name.strip():
        raise ValueError(
            f"device name is empty; give one such as 'h100' or 'rtx4090' (known: {', '.join(list_devices())})"
        )
    devices = _registry()
    key = _normalise(name)
    if key in _index:
        return devices[_index[key]]
    if key == "cpu":
        return cpu_device()
    raise ValueError(_unknown_device_message(name, key))


def _unknown_device_message(name: str, key: str) -> str:
    close = difflib.get_close_matches(key, [*_index, "cpu"], n=10, cutoff=0.5)
    suggestions = list(dict.fromkeys(_index.get(k, "cpu") for k in close))[:4]
    hint = f"; closest known: {', '.join(suggestions)}" if suggestions else ""
    return (
        f"unknown device {name!r}{hint}. Known devices: {', '.join(list_devices())}. To add one, register"
        " it: cost_models.register_device(DeviceSpec(name='my-gpu', memory_bytes=24 * 2**30,"
        " peak_flops={'bf16': 165e12}, memory_bandwidth_bytes_per_s=1e12)), or describe it in a TOML"
        " file in the format of cost_models/catalog.toml and call cost_models.load_devices(path)"
    )


# --------------------------------------------------------------------------- TOML files

_TOML_FIELDS = (
    "vendor_name",
    "aliases",
    "kind",
    "memory_gib",
    "memory_bytes",
    "memory_bandwidth_bytes_per_s",
    "peak_flops",
    "nvlink_generation",
    "nvlink_bandwidth_bytes_per_s",
    "pcie_generation",
    "pcie_bandwidth_bytes_per_s",
    "kernel_overhead_s",
    "source",
)


def load_devices(path: str | os.PathLike, *, replace: bool = False) -> list[DeviceSpec]:
    """Register every device described in a TOML file in the format of ``catalog.toml``.

    Each top-level table is one device, keyed by its canonical name::

        [my-gpu]
        vendor_name = "NVIDIA My GPU"           # what torch.cuda.get_device_name() returns
        memory_gib = 48                         # or memory_bytes = 51539607552
        memory_bandwidth_bytes_per_s = 864e9
        pcie_generation = 4
        source = "My GPU datasheet"

        [my-gpu.peak_flops]                     # dense FLOP/s, no structured sparsity
        fp32 = 91.6e12
        bf16 = 362e12

    Nothing is registered unless every entry of the file is valid.

    Args:
        path: the TOML file.
        replace: let the file's devices override registered devices of the same name.

    Returns:
        The devices of the file, in file order.

    Raises:
        ValueError: the file is not valid TOML, or an entry lacks a required figure or has a
            wrong one; the message names the file, the entry and the field.

    Example:
        >>> [spec.name for spec in load_devices("my_devices.toml")]
        ['my-gpu']
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read device file {str(path)!r}: {e}") from e
    specs = _parse_devices(text, str(path))
    _registry()
    names = [spec.name for spec in specs]
    taken = [n for n in names if n in _devices]
    if taken and not replace:
        raise ValueError(
            f"{path}: {', '.join(taken)} already registered; pass replace=True to override, or rename the entries"
        )
    saved = dict(_devices), dict(_index)
    try:
        for spec in specs:
            _add(spec, replace=replace)
    except ValueError as e:
        _devices.clear(), _devices.update(saved[0])
        _index.clear(), _index.update(saved[1])
        raise ValueError(f"{path}: {e}") from e
    logger.info("registered %d devices from %s: %s", len(specs), path, ", ".join(names))
    return specs


def _parse_devices(text: str, origin: str) -> list[DeviceSpec]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{origin} is not valid TOML: {e}") from e
    if not data:
        raise ValueError(f"{origin} describes no device; add a table such as [my-gpu] (see cost_models/catalog.toml)")
    specs = []
    for name, entry in data.items():
        where = f"{origin}, device [{name}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be a table of figures ([{name}] followed by key = value lines)")
        try:
            specs.append(_spec_from_entry(name, entry))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from e
    return specs


def _spec_from_entry(name: str, entry: dict[str, Any]) -> DeviceSpec:
    unknown = [k for k in entry if k not in _TOML_FIELDS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], _TOML_FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown field {unknown[0]!r}{hint}; fields are {', '.join(_TOML_FIELDS)}")
    fields = dict(entry)
    if "memory_gib" in fields and "memory_bytes" in fields:
        raise ValueError("give memory_gib or memory_bytes, not both")
    if "memory_gib" in fields:
        gib = fields.pop("memory_gib")
        _check_positive("memory_gib", gib, "80")
        fields["memory_bytes"] = int(round(gib * 2**30))
    required = {
        "memory_bytes": "memory_gib = 80 (or memory_bytes = 85899345920)",
        "memory_bandwidth_bytes_per_s": "memory_bandwidth_bytes_per_s = 3.35e12",
        "peak_flops": f"a table [{name}.peak_flops] with lines such as bf16 = 989.5e12",
    }
    for key, example in required.items():
        if key not in fields:
            field_name = "memory_gib" if key == "memory_bytes" else key
            raise ValueError(f"missing {field_name}, e.g. {example}")
    if "aliases" in fields:
        if not isinstance(fields["aliases"], list):
            raise ValueError(f'aliases must be a list of names, e.g. aliases = ["h100"]; got {fields["aliases"]!r}')
        fields["aliases"] = tuple(fields["aliases"])
    for key in ("memory_bandwidth_bytes_per_s", "nvlink_bandwidth_bytes_per_s", "pcie_bandwidth_bytes_per_s"):
        if _is_int(fields.get(key)):
            fields[key] = float(fields[key])
    return DeviceSpec(name=name, **fields)


# --------------------------------------------------------------------------- this host's CPU


def cpu_device(*, calibrate: bool = True) -> DeviceSpec:
    """This host's CPU as a device, with host RAM as its memory.

    With ``calibrate`` (once per process, under half a second), peak fp32 and bf16 FLOP/s
    are the best of a few 1024x1024 matmuls and memory bandwidth the best of a few copies of a
    128 MiB tensor, on PyTorch's current thread count. Without it, conservative defaults are used
    (:data:`CPU_DEFAULT_FLOPS`, :data:`CPU_DEFAULT_MEMORY_BANDWIDTH_BYTES_PER_S`).

    Example:
        >>> cpu = cpu_device()
        >>> cpu.kind, cpu.memory_bytes > 0, cpu.flops_for(torch.float32) > 0
        ('cpu', True, True)
    """
    return _measured_cpu() if calibrate else _default_cpu()


@functools.lru_cache(maxsize=None)
def _default_cpu() -> DeviceSpec:
    return _cpu_spec(
        {"fp32": CPU_DEFAULT_FLOPS, "bf16": CPU_DEFAULT_FLOPS},
        CPU_DEFAULT_MEMORY_BANDWIDTH_BYTES_PER_S,
        source="conservative defaults, not measured (cpu_device(calibrate=False))",
    )


@functools.lru_cache(maxsize=None)
def _measured_cpu() -> DeviceSpec:
    start = time.perf_counter()
    n = _CALIBRATION_MATMUL_SIZE
    flops = {key: _matmul_flops(n, dtype) for key, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    bandwidth = _copy_bandwidth(_CALIBRATION_COPY_BYTES)
    threads = torch.get_num_threads()
    spec = _cpu_spec(
        flops,
        bandwidth,
        source=(
            f"measured on this host with {threads} threads: best {n}x{n} matmul per dtype,"
            f" best copy of a {_CALIBRATION_COPY_BYTES // 2**20} MiB tensor"
        ),
    )
    logger.info(
        "calibrated cpu in %.2f s: fp32 %.3g FLOP/s, bf16 %.3g FLOP/s, memory %.3g B/s",
        time.perf_counter() - start,
        flops["fp32"],
        flops["bf16"],
        bandwidth,
    )
    return spec


def _cpu_spec(peak_flops: dict[str, float], bandwidth_bytes_per_s: float, *, source: str) -> DeviceSpec:
    return DeviceSpec(
        name="cpu",
        memory_bytes=_host_memory_bytes(),
        peak_flops=peak_flops,
        memory_bandwidth_bytes_per_s=bandwidth_bytes_per_s,
        kind="cpu",
        vendor_name=cpu_model_name(),
        pcie_generation=CPU_PCIE_GENERATION,
        source=source,
    )


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        logger.warning("host RAM unknown on this OS; assuming %d GiB", CPU_FALLBACK_MEMORY_BYTES // 2**30)
        return CPU_FALLBACK_MEMORY_BYTES


def cpu_model_name() -> str:
    """The host CPU's model name (``/proc/cpuinfo``), or what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _best_rate(run: Callable[[], object], work: float) -> float:
    """Best ``work`` per second over repeated runs, after one warm-up run, within a time budget."""
    run()
    best = 0.0
    deadline = time.perf_counter() + _CALIBRATION_BUDGET_S
    for i in range(5):
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        best = max(best, work / max(elapsed, 1e-9))
        if i >= 1 and time.perf_counter() > deadline:
            break
    return best


def _matmul_flops(n_max: int, dtype: torch.dtype) -> float:
    """Best matmul FLOP/s at the largest size up to ``n_max`` whose run takes under
    ``_CALIBRATION_RUN_S``: a dtype the CPU has no fast kernel for (bf16 without AVX512-BF16
    runs ~1 GFLOP/s, 2 s per 1024-size matmul) is measured on smaller matrices."""
    n = min(256, n_max)
    while True:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        if n >= n_max or time.perf_counter() - start > _CALIBRATION_RUN_S / 8:
            return _best_rate(lambda: torch.mm(a, b, out=out), 2.0 * n**3)
        n *= 2


def _copy_bandwidth(nbytes: int) -> float:
    # The source is written first: a never-touched tensor reads the OS's shared zero page,
    # which sits in cache and would inflate the figure.
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    return _best_rate(lambda: dst.copy_(src), 2.0 * src.nbytes)  # bytes read + bytes written
