"""Cluster construction and links, and collective times against hand-computed formulas."""

import math

import pytest
import sympy
import torch

from cost_models import cluster as cluster_module
from cost_models.cluster import Cluster, Link
from cost_models.collectives import (
    all_gather_s,
    all_reduce_s,
    all_to_all_s,
    broadcast_s,
    reduce_scatter_s,
    send_recv_s,
)
from cost_models.devices import cpu_device, get_device

GiB = 2**30
NVLINK_H100 = 450e9
A_NVLINK = cluster_module.NVLINK_LATENCY_S
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


# --------------------------------------------------------------------------- parsing and links


def test_one_host_of_four_h100():
    cluster = Cluster.parse("4xh100")
    assert len(cluster) == 4 and cluster.hosts == (0, 0, 0, 0) and cluster.num_hosts == 1
    assert all(d is get_device("h100-sxm") for d in cluster)
    assert cluster.link(0, 3) == Link(NVLINK_H100, A_NVLINK, "nvlink")
    assert cluster.link(2, 2) == Link(math.inf, 0.0, "local")
    assert str(cluster) == cluster.describe() == "4xh100-sxm"


def test_two_hosts_of_eight_h100():
    cluster = Cluster.parse("2x8xh100")
    assert len(cluster) == 16 and cluster.hosts == (0,) * 8 + (1,) * 8
    assert cluster.link(0, 7).kind == "nvlink"
    across = cluster.link(7, 8)
    assert across.kind == "network"
    assert across.bandwidth_bytes_per_s == cluster_module.INFINIBAND_NDR_BYTES_PER_S == 50e9
    assert across.latency_s == cluster_module.NETWORK_LATENCY_S
    assert str(cluster) == "2x8xh100-sxm"


def test_consumer_cards_talk_over_pcie():
    cluster = Cluster.parse("rtx4090+rtx3090")
    assert [d.name for d in cluster] == ["rtx4090", "rtx3090"]
    assert cluster.link(0, 1) == Link(31.5e9, cluster_module.PCIE_LATENCY_S, "pcie")


def test_cpu_offload_device_sits_on_the_same_host_last():
    cluster = Cluster.parse("2xrtx3090+cpu")
    assert [d.name for d in cluster] == ["rtx3090", "rtx3090", "cpu"] and cluster.hosts == (0, 0, 0)
    assert cluster[2] is cpu_device()
    assert cluster.link(0, 2).kind == cluster.link(2, 1).kind == "pcie"
    assert cluster.link(0, 2).bandwidth_bytes_per_s == 31.5e9  # the 3090's gen4 link is the narrower side


def test_link_rules_take_the_slower_side():
    mixed = Cluster.parse("h100+a100")
    assert mixed.link(0, 1) == Link(300e9, A_NVLINK, "nvlink")
    assert Cluster.parse("h100-pcie+l4").link(0, 1).bandwidth_bytes_per_s == 31.5e9  # gen5 vs gen4
    slow_pcie = Cluster.from_specs([get_device("rtx3090")] * 2, hosts=[0, 1], network_bandwidth_bytes_per_s=100e9)
    assert slow_pcie.link(0, 1) == Link(31.5e9, cluster_module.NETWORK_LATENCY_S, "network")
    two_cpus = Cluster.parse("2xcpu").link(0, 1)
    assert two_cpus.kind == "local" and two_cpus.bandwidth_bytes_per_s == cpu_device().memory_bandwidth_bytes_per_s / 2


@pytest.mark.parametrize(
    "text, names, hosts",
    [
        ("h100", ["h100-sxm"], (0,)),
        ("  4 X H100 ", ["h100-sxm"] * 4, (0,) * 4),
        ("2x4090", ["rtx4090"] * 2, (0, 0)),
        ("1x2xa100+1x1xcpu", ["a100-80gb", "a100-80gb", "cpu"], (0, 0, 0)),
        ("2x2xh100+2x1xcpu", ["h100-sxm", "h100-sxm", "cpu"] * 2, (0, 0, 0, 1, 1, 1)),
        ("2xh100 | 2xa100", ["h100-sxm"] * 2 + ["a100-80gb"] * 2, (0, 0, 1, 1)),
    ],
)
def test_parse_forms(text, names, hosts):
    cluster = Cluster.parse(text)
    assert [d.name for d in cluster] == names and cluster.hosts == hosts


@pytest.mark.parametrize(
    "text", ["4xh100", "2x8xh100", "rtx4090+rtx3090", "2xrtx3090+cpu", "2x2xh100+2x1xcpu", "8xh100|4xa100"]
)
def test_describe_reads_back(text):
    cluster = Cluster.parse(text)
    again = Cluster.parse(cluster.describe())
    assert again.devices == cluster.devices and again.hosts == cluster.hosts


def test_network_bandwidth_is_configurable():
    cluster = Cluster.parse("2x8xh100", network_bandwidth_bytes_per_s=25e9)
    assert cluster.link(0, 8).bandwidth_bytes_per_s == 25e9


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("0xh100", "at least 1"),
        ("-2xh100", "at least 1"),
        ("2x0xh100", "at least 1"),
        ("4x", "no device name"),
        ("2x8x", "no device name"),
        ("x4", "count goes before"),
        ("4xh100+", "empty term"),
        ("+h100", "empty term"),
        ("h100||h100", "empty part"),
        ("3x2x8xh100", "more than two counts"),
        ("2x8xh100+cpu", "same host count"),
        ("4xh10", "closest known: h100-sxm"),
    ],
)
def test_bad_cluster_strings_explain_themselves(text, fragment):
    with pytest.raises(ValueError) as info:
        Cluster.parse(text)
    message = str(info.value)
    assert fragment in message
    assert "e.g." in message or "closest known" in message


def test_cluster_validation():
    h100 = get_device("h100")
    with pytest.raises(ValueError, match="one host index per device"):
        Cluster.from_specs([h100] * 2, hosts=[0])
    with pytest.raises(ValueError, match="at least one device"):
        Cluster.from_specs([])
    with pytest.raises(TypeError, match="DeviceSpec"):
        Cluster(("h100",))
    with pytest.raises(ValueError, match="network_bandwidth_bytes_per_s"):
        Cluster.parse("h100", network_bandwidth_bytes_per_s=0)
    with pytest.raises(TypeError, match="Cluster.parse"):
        Cluster.from_devices("4xh100")
    with pytest.raises(ValueError, match=r"0\.\.3"):
        Cluster.parse("4xh100").link(0, 4)


# --------------------------------------------------------------------------- local devices


@no_cuda
def test_from_devices_without_cuda():
    cluster = Cluster.from_devices(["cpu", "cpu"])
    assert [d.kind for d in cluster] == ["cpu", "cpu"] and cluster.hosts == (0, 0)
    assert [d.name for d in Cluster.from_devices(["h100", torch.device("cpu")])] == ["h100-sxm", "cpu"]
    with pytest.raises(ValueError) as info:
        Cluster.from_devices(["cuda:0"])
    assert "torch.cuda.is_available() is False" in str(info.value) and "Cluster.parse('4xh100')" in str(info.value)


@no_cuda
def test_local_without_cuda_gives_cpu_devices():
    assert [d.kind for d in Cluster.local(2)] == ["cpu", "cpu"]
    assert len(Cluster.local()) == 1
    with pytest.raises(ValueError, match="n must be"):
        Cluster.local(0)


# --------------------------------------------------------------------------- groups


def test_group_bandwidth_and_latency_follow_the_ring():
    cluster = Cluster.parse("2x8xh100")
    assert cluster.group_bandwidth_bytes_per_s(range(8)) == NVLINK_H100
    assert cluster.group_latency_s(range(8)) == A_NVLINK
    assert cluster.group_bandwidth_bytes_per_s([0, 1, 8, 9]) == 50e9
    assert cluster.group_latency_s([0, 1, 8, 9]) == cluster_module.NETWORK_LATENCY_S
    assert cluster.group_bandwidth_bytes_per_s([3]) == math.inf and cluster.group_latency_s([3]) == 0.0
    with pytest.raises(ValueError, match="distinct"):
        cluster.group_bandwidth_bytes_per_s([0, 0])
    with pytest.raises(ValueError, match="at least one"):
        cluster.group_latency_s([])


# --------------------------------------------------------------------------- collectives


def test_ring_all_reduce_of_one_gib_on_four_h100():
    cluster = Cluster.parse("4xh100")
    expected = 2 * 3 / 4 * GiB / NVLINK_H100 + 2 * 3 * A_NVLINK
    assert all_reduce_s(cluster, range(4), GiB, algorithm="ring") == pytest.approx(expected, rel=1e-12)
    assert all_reduce_s(cluster, range(4), GiB) == pytest.approx(expected, rel=1e-12)  # ring wins when large
    tree = 2 * GiB / NVLINK_H100 + 2 * 2 * A_NVLINK
    assert all_reduce_s(cluster, range(4), GiB, algorithm="tree") == pytest.approx(tree, rel=1e-12)


def test_running_example_of_the_module_docstring():
    assert all_reduce_s(Cluster.parse("8xh100"), range(8), GiB) == pytest.approx(4.20e-3, abs=0.01e-3)


def test_tree_wins_when_latency_bound():
    cluster = Cluster.parse("8xh100")
    nbytes = 64 * 2**10
    ring = all_reduce_s(cluster, range(8), nbytes, algorithm="ring")
    tree = all_reduce_s(cluster, range(8), nbytes, algorithm="tree")
    assert tree < ring and all_reduce_s(cluster, range(8), nbytes) == tree
    assert ring == pytest.approx(2 * 7 / 8 * nbytes / NVLINK_H100 + 14 * A_NVLINK)


def test_one_rank_and_zero_bytes_cost_nothing():
    cluster = Cluster.parse("4xh100")
    for collective in (all_reduce_s, all_gather_s, reduce_scatter_s, all_to_all_s, broadcast_s):
        assert collective(cluster, [2], GiB) == 0.0
        assert collective(cluster, range(4), 0) == 0.0
    assert send_recv_s(cluster, 1, 1, GiB) == 0.0


def test_ring_pass_collectives_and_broadcast():
    cluster = Cluster.parse("2x8xh100")
    within = (7 / 8) * GiB / NVLINK_H100 + 7 * A_NVLINK
    assert all_gather_s(cluster, range(8), GiB) == pytest.approx(within)
    assert reduce_scatter_s(cluster, range(8), GiB) == pytest.approx(within)
    across = (15 / 16) * GiB / 50e9 + 15 * cluster_module.NETWORK_LATENCY_S
    assert all_to_all_s(cluster, range(16), GiB) == pytest.approx(across)
    assert broadcast_s(cluster, range(8), GiB) == pytest.approx(GiB / NVLINK_H100 + 7 * A_NVLINK)


def test_send_recv_across_hosts_is_slower_than_within():
    cluster = Cluster.parse("2x8xh100")
    within, across = send_recv_s(cluster, 0, 1, 2**20), send_recv_s(cluster, 0, 8, 2**20)
    assert within == pytest.approx(A_NVLINK + 2**20 / NVLINK_H100)
    assert across == pytest.approx(cluster_module.NETWORK_LATENCY_S + 2**20 / 50e9)
    assert within < across


def test_collective_input_errors():
    cluster = Cluster.parse("4xh100")
    with pytest.raises(ValueError, match="nbytes"):
        all_reduce_s(cluster, range(4), -1)
    with pytest.raises(ValueError, match="nbytes"):
        send_recv_s(cluster, 0, 1, -1.0)
    with pytest.raises(ValueError, match="algorithm"):
        all_reduce_s(cluster, range(4), GiB, algorithm="butterfly")
    with pytest.raises(TypeError, match="nbytes"):
        all_gather_s(cluster, range(4), "1GiB")
    with pytest.raises(TypeError, match="Cluster"):
        broadcast_s("4xh100", range(4), GiB)


def test_symbolic_sizes():
    batch = sympy.Symbol("batch", positive=True)
    cluster = Cluster.parse("8xh100")
    t = all_reduce_s(cluster, range(8), 4096 * batch)
    assert isinstance(t, sympy.Min)
    assert float(t.subs(batch, 16)) == pytest.approx(all_reduce_s(cluster, range(8), 4096 * 16))
    with pytest.raises(ValueError, match="negative"):
        all_gather_s(cluster, range(8), -batch)
