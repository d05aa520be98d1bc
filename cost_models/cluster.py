"""Cluster: the ordered devices a model is split over, their hosts, and the link between every pair.

    cluster = Cluster.parse("2x8xh100")       # 2 hosts of 8 H100 SXM
    len(cluster), cluster.hosts[8]            # (16, 1)
    cluster.link(0, 1)                        # Link(bandwidth_bytes_per_s=450e9, latency_s=2e-06, kind='nvlink')
    cluster.link(0, 8).kind                   # 'network'
    str(Cluster.parse("rtx4090 + rtx3090"))   # 'rtx4090+rtx3090'

Links follow simple rules from the devices' specs (see :meth:`Cluster.link`); bandwidths are per
direction, latencies are assumed constants (below), not measurements.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from cost_models.devices import DeviceSpec, cpu_device, get_device

logger = logging.getLogger(__name__)

LINK_KINDS = ("local", "nvlink", "pcie", "network")

NVLINK_LATENCY_S = 2e-6
"""Assumed one-way latency of a transfer over NVLink/NVSwitch: the order of NCCL's small-message
latency within an NVSwitch node (a few microseconds, launch included)."""

PCIE_LATENCY_S = 5e-6
"""Assumed latency of a transfer over PCIe (through host memory or peer-to-peer): an assumption
of the order of a cudaMemcpy's fixed cost."""

NETWORK_LATENCY_S = 5e-6
"""Assumed latency between hosts over InfiniBand with GPUDirect RDMA: an assumption (NCCL's
inter-node small-message latency is a few to ~10 microseconds)."""

HOST_MEMORY_LATENCY_S = 1e-6
"""Assumed latency of a copy in host memory between two CPU devices of one host."""

INFINIBAND_NDR_BYTES_PER_S = 50e9
"""400 Gb/s InfiniBand NDR, per direction: one ConnectX-7 port per GPU, as in NVIDIA DGX H100
(DGX H100 user guide: eight single-port 400 Gb/s ConnectX-7 adapters for the compute fabric)."""

DEFAULT_NETWORK_BANDWIDTH_BYTES_PER_S = INFINIBAND_NDR_BYTES_PER_S
"""Bandwidth per device between hosts unless the cluster is given another."""

_CLUSTER_EXAMPLES = "e.g. '4xh100', '2x8xh100' (2 hosts of 8) or 'rtx4090+rtx3090+cpu'"
_COUNT = re.compile(r"(-?\d+)x")


@dataclass(frozen=True)
class Link:
    """How fast one device reaches another."""

    bandwidth_bytes_per_s: float
    """Per direction; ``math.inf`` from a device to itself."""
    latency_s: float
    """Fixed time of one transfer, whatever its size."""
    kind: str
    """``"local"`` (the same device, or two CPU devices of one host), ``"nvlink"``, ``"pcie"`` or
    ``"network"`` (between hosts)."""

    def __post_init__(self) -> None:
        if self.kind not in LINK_KINDS:
            raise ValueError(f"link kind must be one of {LINK_KINDS}, e.g. 'nvlink'; got {self.kind!r}")
        if not self.bandwidth_bytes_per_s > 0:
            raise ValueError(f"bandwidth_bytes_per_s must be positive, e.g. 450e9; got {self.bandwidth_bytes_per_s!r}")
        if not self.latency_s >= 0:
            raise ValueError(f"latency_s must be >= 0, e.g. 2e-6; got {self.latency_s!r}")

    def transfer_s(self, nbytes: float) -> float:
        """Time to send ``nbytes`` over the link: latency + size / bandwidth (0 for nothing)."""
        return 0.0 if nbytes == 0 else self.latency_s + nbytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class Cluster:
    """Ordered devices, the host each sits on, and how every pair is linked.

    Build one with :meth:`parse` (``"2x8xh100"``), :meth:`from_devices` (``["cuda:0", "cpu"]``),
    :meth:`local` (what torch sees here) or :meth:`from_specs`.

    Example:
        >>> cluster = Cluster.parse("2xrtx3090+cpu")
        >>> [d.name for d in cluster], cluster.link(0, 2).kind
        (['rtx3090', 'rtx3090', 'cpu'], 'pcie')
    """

    devices: tuple[DeviceSpec, ...]
    """The devices, in rank order."""
    hosts: tuple[int, ...] = ()
    """Host (node) index of every device; empty means all on host 0."""
    network_bandwidth_bytes_per_s: float = DEFAULT_NETWORK_BANDWIDTH_BYTES_PER_S
    """Bandwidth per device between hosts, per direction (default: 400 Gb/s InfiniBand NDR)."""
    network_latency_s: float = NETWORK_LATENCY_S
    """Latency between hosts."""

    def __post_init__(self) -> None:
        devices = tuple(self.devices)
        if not devices:
            raise ValueError(f"a cluster needs at least one device, {_CLUSTER_EXAMPLES}")
        bad = [d for d in devices if not isinstance(d, DeviceSpec)]
        if bad:
            raise TypeError(f"Cluster devices must be DeviceSpec (see get_device); got {type(bad[0]).__name__}")
        hosts = tuple(self.hosts) or (0,) * len(devices)
        if len(hosts) != len(devices):
            raise ValueError(
                f"hosts must give one host index per device: {len(devices)} devices but {len(hosts)} hosts,"
                f" e.g. hosts=(0, 0, 1, 1) for 2 hosts of 2"
            )
        if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hosts):
            raise ValueError(f"hosts must be ints >= 0, e.g. (0, 0, 1, 1); got {self.hosts!r}")
        if not self.network_bandwidth_bytes_per_s > 0:
            raise ValueError(
                "network_bandwidth_bytes_per_s must be positive, e.g. 50e9 (400 Gb/s);"
                f" got {self.network_bandwidth_bytes_per_s!r}"
            )
        if not self.network_latency_s >= 0:
            raise ValueError(f"network_latency_s must be >= 0, e.g. 5e-6; got {self.network_latency_s!r}")
        object.__setattr__(self, "devices", devices)
        object.__setattr__(self, "hosts", hosts)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def parse(
        cls, text: str, *, network_bandwidth_bytes_per_s: float = DEFAULT_NETWORK_BANDWIDTH_BYTES_PER_S
    ) -> Cluster:
        """A cluster from a string such as ``"4xh100"``, ``"2x8xh100"`` or ``"2xrtx3090+cpu"``.

        Grammar (whitespace and case do not matter)::

            cluster := hosts ("|" hosts)*          "|" starts new hosts
            hosts   := term ("+" term)*            "+" adds devices to the same host(s)
            term    := [H "x"] [N "x"] device      H hosts of N devices each (both default to 1)

        ``"2x8xh100"`` is 2 hosts of 8, ranks 0-7 on host 0; ``"2x8xh100+2x1xcpu"`` puts a CPU on
        each host. Device names are anything :func:`get_device` resolves; ``cpu`` is this machine's
        CPU, measured (register a ``"cpu"`` DeviceSpec to plan for another host's CPU).

        Raises:
            ValueError: empty or malformed string, a count below 1, or an unknown device; the
                message shows a valid example.

        Example:
            >>> Cluster.parse("2x8xh100").describe()
            '2x8xh100-sxm'
        """
        if not isinstance(text, str):
            raise TypeError(f"Cluster.parse takes a str, {_CLUSTER_EXAMPLES}; got {type(text).__name__}")
        compact = re.sub(r"\s+", "", text).lower()
        if not compact:
            raise ValueError(f"cluster string is empty; describe the devices, {_CLUSTER_EXAMPLES}")
        devices: list[DeviceSpec] = []
        hosts: list[int] = []
        next_host = 0
        for group in compact.split("|"):
            if not group:
                raise ValueError(f"cluster {text!r} has an empty part around '|', {_CLUSTER_EXAMPLES}")
            terms = [_parse_term(term, text) for term in group.split("+")]
            host_counts = {h for h, _, _ in terms}
            if len(host_counts) > 1:
                raise ValueError(
                    f"cluster {text!r} joins terms over {sorted(host_counts)} hosts with '+'; give every term"
                    " the same host count, e.g. '2x8xh100+2x1xcpu' (a CPU on each of 2 hosts), or start"
                    " other hosts with '|', e.g. '8xh100|4xa100'"
                )
            for host in range(terms[0][0]):
                for _, per_host, spec in terms:
                    devices += [spec] * per_host
                    hosts += [next_host + host] * per_host
            next_host += terms[0][0]
        return cls(tuple(devices), tuple(hosts), network_bandwidth_bytes_per_s=network_bandwidth_bytes_per_s)

    @classmethod
    def from_devices(
        cls,
        devices: Sequence[str | torch.device | DeviceSpec],
        *,
        network_bandwidth_bytes_per_s: float = DEFAULT_NETWORK_BANDWIDTH_BYTES_PER_S,
    ) -> Cluster:
        """A one-host cluster from torch device strings, catalog names or specs.

        ``"cuda:N"`` is looked up by ``torch.cuda.get_device_name(N)``; ``"cpu"`` is this host's
        CPU (measured once per process); any other string is a catalog name (``"h100"``).

        Raises:
            ValueError: a CUDA device is named but CUDA is not available or has fewer devices, or
                a name is unknown.

        Example:
            >>> Cluster.from_devices(["cpu", "cpu"]).describe()
            '2xcpu'
        """
        if isinstance(devices, (str, torch.device, DeviceSpec)):
            raise TypeError(
                f"from_devices takes a list of devices, e.g. ['cuda:0', 'cuda:1']; got {devices!r}"
                " (use Cluster.parse for a string such as '4xh100')"
            )
        specs = [_resolve_local(d) for d in devices]
        if not specs:
            raise ValueError("from_devices needs at least one device, e.g. ['cuda:0', 'cuda:1'] or ['cpu']")
        return cls(tuple(specs), network_bandwidth_bytes_per_s=network_bandwidth_bytes_per_s)

    @classmethod
    def local(cls, n: int | None = None) -> Cluster:
        """The devices torch sees on this machine: the first ``n`` CUDA devices (all by default).

        Without CUDA, ``n`` CPU devices (default 1) on one host: enough to run a split model on a
        laptop or in CI.

        Example:
            >>> len(Cluster.local(2))
            2
        """
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise ValueError(f"n must be a device count >= 1, e.g. Cluster.local(2); got {n!r}")
        if torch.cuda.is_available():
            count = torch.cuda.device_count()
            n = count if n is None else n
            if n > count:
                raise ValueError(
                    f"Cluster.local({n}) asks for {n} CUDA devices but torch sees {count}; use n <= {count}"
                )
            return cls.from_devices([f"cuda:{i}" for i in range(n)])
        n = 1 if n is None else n
        logger.info("no CUDA device visible: a cluster of %d CPU device(s)", n)
        return cls((cpu_device(),) * n)

    @classmethod
    def from_specs(
        cls,
        specs: Sequence[DeviceSpec],
        hosts: Sequence[int] | None = None,
        *,
        network_bandwidth_bytes_per_s: float = DEFAULT_NETWORK_BANDWIDTH_BYTES_PER_S,
    ) -> Cluster:
        """A cluster from device specs and, optionally, the host of each (default: all on one).

        Example:
            >>> h100 = get_device("h100")
            >>> Cluster.from_specs([h100] * 4, hosts=[0, 0, 1, 1]).describe()
            '2x2xh100-sxm'
        """
        return cls(tuple(specs), tuple(hosts or ()), network_bandwidth_bytes_per_s=network_bandwidth_bytes_per_s)

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self.devices)

    def __iter__(self) -> Iterator[DeviceSpec]:
        return iter(self.devices)

    def __getitem__(self, rank: int) -> DeviceSpec:
        return self.devices[rank]

    def __str__(self) -> str:
        return self.describe()

    @property
    def num_hosts(self) -> int:
        return len(set(self.hosts))

    def link(self, i: int, j: int) -> Link:
        """The link from device ``i`` to device ``j``.

        Rules, in order:

        - ``i == j``: ``local``, infinite bandwidth, no latency.
        - different hosts: ``network`` at the cluster's network bandwidth, or less where a
          device's PCIe link (which carries its traffic to the NIC) is slower.
        - same host, both GPUs with NVLink: ``nvlink`` at the smaller of the two NVLink
          bandwidths. Every pair gets the full figure: this assumes NVSwitch systems (HGX/DGX),
          where any two GPUs of a host connect at full bandwidth.
        - same host, both CPU devices: ``local``, a copy in host memory.
        - same host otherwise (GPUs without NVLink, or a GPU and the CPU): ``pcie`` at the
          smaller of the two PCIe bandwidths.

        Example:
            >>> Cluster.parse("rtx4090+rtx3090").link(0, 1)
            Link(bandwidth_bytes_per_s=31500000000.0, latency_s=5e-06, kind='pcie')
        """
        self._check_rank(i)
        self._check_rank(j)
        if i == j:
            return Link(math.inf, 0.0, "local")
        a, b = self.devices[i], self.devices[j]
        pcie = min(a.pcie_bandwidth_bytes_per_s, b.pcie_bandwidth_bytes_per_s)
        if self.hosts[i] != self.hosts[j]:
            return Link(min(self.network_bandwidth_bytes_per_s, pcie), self.network_latency_s, "network")
        if a.kind == b.kind == "gpu" and a.has_nvlink and b.has_nvlink:
            return Link(min(a.nvlink_bandwidth_bytes_per_s, b.nvlink_bandwidth_bytes_per_s), NVLINK_LATENCY_S, "nvlink")
        if a.kind == b.kind == "cpu":
            bandwidth = min(a.memory_bandwidth_bytes_per_s, b.memory_bandwidth_bytes_per_s) / 2  # read + write
            return Link(bandwidth, HOST_MEMORY_LATENCY_S, "local")
        return Link(pcie, PCIE_LATENCY_S, "pcie")

    def group_bandwidth_bytes_per_s(self, ranks: Sequence[int]) -> float:
        """The bottleneck (smallest) link bandwidth along a ring over ``ranks`` in the given order.

        ``math.inf`` for a single rank.

        Example:
            >>> Cluster.parse("2x8xh100").group_bandwidth_bytes_per_s(range(16))
            50000000000.0
        """
        ring = self._ring(ranks)
        return min((self.link(i, j).bandwidth_bytes_per_s for i, j in ring), default=math.inf)

    def group_latency_s(self, ranks: Sequence[int]) -> float:
        """The largest link latency along a ring over ``ranks`` in the given order (0 for one rank).

        Example:
            >>> Cluster.parse("4xh100").group_latency_s([0, 1, 2, 3])
            2e-06
        """
        ring = self._ring(ranks)
        return max((self.link(i, j).latency_s for i, j in ring), default=0.0)

    def describe(self) -> str:
        """A short summary that :meth:`parse` reads back, e.g. ``"2x8xh100-sxm"``.

        Hosts with the same devices are counted (``"2x8xh100-sxm+2x1xcpu"``); different hosts are
        separated by ``" | "``.
        """
        by_host: dict[int, list[str]] = {}
        for spec, host in zip(self.devices, self.hosts):
            by_host.setdefault(host, []).append(spec.name)
        runs = [tuple((name, len(list(g))) for name, g in itertools.groupby(names)) for names in by_host.values()]
        parts = []
        for host_runs, same in itertools.groupby(runs):
            count = len(list(same))
            if count == 1:
                parts.append("+".join(name if n == 1 else f"{n}x{name}" for name, n in host_runs))
            else:
                parts.append("+".join(f"{count}x{n}x{name}" for name, n in host_runs))
        return " | ".join(parts)

    def _check_rank(self, rank: int) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < len(self.devices):
            raise ValueError(f"device index must be an int in 0..{len(self.devices) - 1}; got {rank!r}")

    def _ring(self, ranks: Sequence[int]) -> list[tuple[int, int]]:
        ranks = list(ranks)
        if not ranks:
            raise ValueError("ranks must name at least one device, e.g. [0, 1, 2, 3]")
        for rank in ranks:
            self._check_rank(rank)
        if len(set(ranks)) != len(ranks):
            raise ValueError(f"ranks must be distinct device indices, e.g. [0, 1, 2, 3]; got {ranks}")
        if len(ranks) == 1:
            return []
        return [(ranks[k], ranks[(k + 1) % len(ranks)]) for k in range(len(ranks))]


def _parse_term(term: str, text: str) -> tuple[int, int, DeviceSpec]:
    """``"2x8xh100"`` -> (2 hosts, 8 per host, h100's spec); ``"4xh100"`` -> (1, 4, ...)."""
    if not term:
        raise ValueError(f"cluster {text!r} has an empty term around '+', {_CLUSTER_EXAMPLES}")
    counts = []
    rest = term
    while (match := _COUNT.match(rest)) and len(counts) < 2:
        counts.append(int(match.group(1)))
        rest = rest[match.end() :]
    for count in counts:
        if count < 1:
            raise ValueError(
                f"cluster {text!r}: a device count must be at least 1, got {count} in {term!r}, {_CLUSTER_EXAMPLES}"
            )
    if not rest:
        raise ValueError(f"cluster {text!r}: {term!r} has a count but no device name after it, e.g. '4xh100'")
    if _COUNT.match(rest):
        raise ValueError(
            f"cluster {text!r}: {term!r} has more than two counts; at most hosts x devices, e.g. '2x8xh100'"
        )
    if not counts and re.match(r"x\d", rest):
        raise ValueError(f"cluster {text!r}: in {term!r} the count goes before the 'x', e.g. '4xh100'")
    try:
        spec = get_device(rest)
    except ValueError as e:
        raise ValueError(f"cluster {text!r}: {e}") from e
    if len(counts) == 2:
        return counts[0], counts[1], spec
    return 1, (counts[0] if counts else 1), spec


def _resolve_local(device: str | torch.device | DeviceSpec) -> DeviceSpec:
    if isinstance(device, DeviceSpec):
        return device
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"devices must be strings such as 'cuda:0', torch.device or DeviceSpec; got {device!r}")
    name = str(device).strip().lower()
    if name in ("cpu", "cpu:0"):
        return cpu_device()
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        return get_device(name)
    index = int(match.group(1) or 0)
    if not torch.cuda.is_available():
        raise ValueError(
            f"{name!r} names a CUDA device but torch.cuda.is_available() is False here (no GPU, or a CPU"
            " build of torch); to plan for GPUs this machine lacks, name them: Cluster.parse('4xh100')"
            " or Cluster.from_devices(['h100', 'h100'])"
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"{name!r}: torch sees {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    vendor_name = torch.cuda.get_device_name(index)
    try:
        return get_device(vendor_name)
    except ValueError as e:
        raise ValueError(
            f"{name!r} is a {vendor_name!r}, which the device catalog does not know: register it with"
            f" cost_models.register_device(DeviceSpec(..., vendor_name={vendor_name!r})) or"
            f" cost_models.load_devices(path). {e}"
        ) from e
