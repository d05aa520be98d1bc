"""Device catalog: name resolution, catalog figures, DeviceSpec checks, TOML files, the host CPU."""

import os

import pytest
import torch

from cost_models import devices
from cost_models.devices import (
    PRECISIONS,
    DeviceSpec,
    cpu_device,
    get_device,
    list_devices,
    load_devices,
    register_device,
)

REQUIRED = ["h100-sxm", "h100-pcie", "h200", "b200", "a100-80gb", "a100-40gb", "l40s", "l4", "rtx4090", "rtx3090"]
CATALOG = [name for name in list_devices() if name != "cpu"]


@pytest.fixture
def scratch_registry(monkeypatch):
    """Devices registered by a test are forgotten after it."""
    monkeypatch.setattr(devices, "_devices", dict(devices._registry()))
    monkeypatch.setattr(devices, "_index", dict(devices._index))


def small_spec(name="test-gpu", **overrides):
    fields = dict(
        memory_bytes=24 * 2**30, peak_flops={"fp32": 40e12, "bf16": 160e12}, memory_bandwidth_bytes_per_s=1e12
    )
    fields.update(overrides)
    return DeviceSpec(name, **fields)


# --------------------------------------------------------------------------- lookups


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("h100-sxm", "h100-sxm"),
        ("H100", "h100-sxm"),
        ("h100_sxm", "h100-sxm"),
        ("  H100 SXM  ", "h100-sxm"),
        ("NVIDIA H100 80GB HBM3", "h100-sxm"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA B200", "b200"),
        ("a100", "a100-80gb"),
        ("A100_80GB", "a100-80gb"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("4090", "rtx4090"),
        ("rtx4090", "rtx4090"),
        ("rtx-4090", "rtx4090"),
        ("RTX 4090", "rtx4090"),
        ("GeForce RTX 4090", "rtx4090"),
        ("NVIDIA GeForce RTX 4090", "rtx4090"),
        ("NVIDIA GeForce RTX 3090", "rtx3090"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA L4", "l4"),
    ],
)
def test_names_resolve(name, canonical):
    assert get_device(name).name == canonical


def test_catalog_has_the_common_parts_and_every_name_resolves_to_its_entry():
    assert set(REQUIRED) <= set(CATALOG)
    assert list_devices()[-1] == "cpu"
    for name in CATALOG:
        spec = get_device(name)
        assert spec.name == name
        for other in (spec.vendor_name, *spec.aliases):
            assert get_device(other) is spec, other


def test_unknown_name_suggests_close_names_and_how_to_add_one():
    with pytest.raises(ValueError) as info:
        get_device("h10")
    message = str(info.value)
    assert "'h10'" in message and "closest known: h100-sxm" in message
    assert "register_device" in message and "load_devices" in message


def test_empty_or_non_string_name():
    with pytest.raises(ValueError, match="empty"):
        get_device("  ")
    with pytest.raises(TypeError, match="str"):
        get_device(100)


# --------------------------------------------------------------------------- catalog figures


@pytest.mark.parametrize("name", CATALOG)
def test_catalog_entry_is_sourced_and_consistent(name):
    spec = get_device(name)
    assert spec.kind == "gpu" and spec.vendor_name.startswith("NVIDIA ")
    assert "datasheet" in spec.source or "whitepaper" in spec.source
    flops = spec.peak_flops
    assert set(flops) <= set(PRECISIONS) and {"fp32", "tf32", "bf16", "fp16", "int8"} <= set(flops)
    assert flops["fp32"] < flops["bf16"] and flops["tf32"] <= flops["bf16"]
    if "fp8" in flops:
        assert flops["bf16"] <= flops["fp8"]
    assert 16 * 2**30 <= spec.memory_bytes <= 192 * 2**30
    assert 2e11 <= spec.memory_bandwidth_bytes_per_s <= 1e13
    assert spec.pcie_bandwidth_bytes_per_s == devices.PCIE_X16_BYTES_PER_S[spec.pcie_generation]
    assert (spec.nvlink_generation is None) == (spec.nvlink_bandwidth_bytes_per_s == 0)


def test_h100_sxm_figures_are_dense_and_per_direction():
    h100 = get_device("h100")
    assert h100.memory_bytes == 80 * 2**30
    assert h100.memory_bandwidth_bytes_per_s == 3.35e12
    assert h100.peak_flops["bf16"] == 989.5e12  # 1,979 "with sparsity" / 2
    assert h100.peak_flops["fp8"] == 1979e12
    assert h100.peak_flops["tf32"] == 494.5e12 and h100.peak_flops["fp32"] == 67e12
    assert (h100.nvlink_generation, h100.nvlink_bandwidth_bytes_per_s) == (4, 450e9)  # 900 GB/s both ways
    assert (h100.pcie_generation, h100.pcie_bandwidth_bytes_per_s) == (5, 63e9)
    assert get_device("a100").nvlink_bandwidth_bytes_per_s == 300e9
    assert not get_device("rtx4090").has_nvlink and get_device("rtx4090").pcie_bandwidth_bytes_per_s == 31.5e9


# --------------------------------------------------------------------------- flops_for


@pytest.mark.parametrize(
    "dtype, key",
    [
        (torch.float64, "fp64"),
        (torch.float32, "fp32"),
        (torch.bfloat16, "bf16"),
        (torch.float16, "fp16"),
        (torch.float8_e4m3fn, "fp8"),
        (torch.float8_e5m2, "fp8"),
        (torch.int8, "int8"),
        ("tf32", "tf32"),
        ("bfloat16", "bf16"),
        ("torch.float16", "fp16"),
    ],
)
def test_flops_for_maps_dtypes_to_precisions(dtype, key):
    h100 = get_device("h100")
    assert h100.flops_for(dtype) == h100.peak_flops[key]
    assert devices.precision_key(dtype) == key


def test_flops_for_a_precision_the_device_lacks():
    with pytest.raises(ValueError) as info:
        get_device("a100").flops_for(torch.float8_e4m3fn)
    message = str(info.value)
    assert "a100-80gb" in message and "float8_e4m3fn" in message and "bf16" in message
    with pytest.raises(ValueError, match="int32"):
        get_device("h100").flops_for(torch.int32)
    with pytest.raises(ValueError, match="fp4"):
        get_device("h100").flops_for("fp4")


# --------------------------------------------------------------------------- DeviceSpec


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"memory_bytes": -1}, "memory_bytes"),
        ({"memory_bytes": 0}, "memory_bytes"),
        ({"memory_bytes": 2.5e10}, "memory_bytes"),
        ({"peak_flops": {}}, "peak_flops"),
        ({"peak_flops": {"fp4": 1e15}}, "fp4"),
        ({"peak_flops": {"bf16": -1.0}}, "peak_flops['bf16']"),
        ({"memory_bandwidth_bytes_per_s": 0}, "memory_bandwidth_bytes_per_s"),
        ({"kind": "tpu"}, "kind"),
        ({"nvlink_generation": 4}, "nvlink_bandwidth_bytes_per_s"),
        ({"nvlink_bandwidth_bytes_per_s": -1.0}, "nvlink_bandwidth_bytes_per_s"),
        ({"pcie_generation": 9}, "pcie_generation"),
        ({"kernel_overhead_s": -1e-6}, "kernel_overhead_s"),
        ({"aliases": ("ok", "")}, "aliases"),
    ],
)
def test_spec_validation_names_the_field_and_an_example(overrides, field):
    with pytest.raises(ValueError) as info:
        small_spec(**overrides)
    assert field in str(info.value) and "e.g." in str(info.value)


@pytest.mark.parametrize("name", ["H100", "my gpu", "a+b", ""])
def test_spec_name_is_a_lowercase_id(name):
    with pytest.raises(ValueError, match="name must be"):
        small_spec(name)


def test_spec_defaults_pcie_bandwidth_from_generation():
    assert small_spec(pcie_generation=3).pcie_bandwidth_bytes_per_s == 15.75e9
    assert small_spec(pcie_generation=5, pcie_bandwidth_bytes_per_s=50e9).pcie_bandwidth_bytes_per_s == 50e9
    spec = small_spec(aliases=["x1"])
    assert spec.aliases == ("x1",) and list(spec.peak_flops) == ["fp32", "bf16"]
    assert hash(spec) == hash(small_spec(aliases=["x1"])) and spec == small_spec(aliases=["x1"])


# --------------------------------------------------------------------------- registering


def test_register_device(scratch_registry):
    register_device(small_spec("test-gpu", aliases=("tg1",), vendor_name="NVIDIA Test GPU"))
    assert get_device("TG1").name == get_device("NVIDIA Test GPU").name == "test-gpu"
    assert "test-gpu" in list_devices()
    with pytest.raises(ValueError, match="replace=True"):
        register_device(small_spec("test-gpu"))
    register_device(small_spec("test-gpu", memory_bytes=2**30), replace=True)
    assert get_device("test-gpu").memory_bytes == 2**30
    with pytest.raises(ValueError, match="tg1"):
        get_device("tg1")  # the replaced spec's alias is gone with it
    with pytest.raises(ValueError, match="already means 'h100-sxm'"):
        register_device(small_spec("other-gpu", aliases=("H100",)))


def test_registered_cpu_overrides_the_measured_one(scratch_registry):
    target = small_spec("cpu", kind="cpu", memory_bytes=512 * 2**30)
    register_device(target)
    assert get_device("cpu") is target


def test_load_devices_from_toml(tmp_path, scratch_registry):
    path = tmp_path / "devices.toml"
    path.write_text(
        """
[my-gpu]
vendor_name = "NVIDIA My GPU"
aliases = ["mine"]
memory_gib = 48
memory_bandwidth_bytes_per_s = 864e9
pcie_generation = 4
source = "My GPU datasheet"

[my-gpu.peak_flops]
fp32 = 91.6e12
bf16 = 362e12

[my-nvl-gpu]
memory_bytes = 1073741824
memory_bandwidth_bytes_per_s = 1000000000000
nvlink_generation = 5
nvlink_bandwidth_bytes_per_s = 900e9
peak_flops = { bf16 = 1e15 }
"""
    )
    specs = load_devices(path)
    assert [s.name for s in specs] == ["my-gpu", "my-nvl-gpu"]
    mine = get_device("Mine")
    assert mine is specs[0] and mine.memory_bytes == 48 * 2**30 and mine.flops_for(torch.bfloat16) == 362e12
    assert get_device("NVIDIA My GPU") is mine and get_device("my-nvl-gpu").has_nvlink
    with pytest.raises(ValueError, match="already registered"):
        load_devices(path)
    assert load_devices(path, replace=True)[0].name == "my-gpu"


@pytest.mark.parametrize(
    "body, fragments",
    [
        ("memory_gib = 24\n[bad.peak_flops]\nbf16 = 1e14", ["memory_bandwidth_bytes_per_s", "e.g."]),
        ("memory_gib = 24\nmemory_bandwidth_bytes_per_s = 1e12", ["peak_flops", "bf16 = "]),
        ("memory_bandwidth_bytes_per_s = 1e12\n[bad.peak_flops]\nbf16 = 1e14", ["memory_gib", "e.g."]),
        ("memory_gib = 24\nmemory_bandwith_bytes_per_s = 1e12", ["memory_bandwith_bytes_per_s", "did you mean"]),
        ("memory_gib = -4\nmemory_bandwidth_bytes_per_s = 1e12\npeak_flops = {bf16 = 1e14}", ["memory_gib"]),
        ("memory_gib = 4\nmemory_bandwidth_bytes_per_s = 1e12\npeak_flops = {bf16 = 0}", ["peak_flops['bf16']"]),
    ],
)
def test_load_devices_errors_name_file_entry_and_field(tmp_path, scratch_registry, body, fragments):
    path = tmp_path / "broken.toml"
    fine = "[fine]\nmemory_gib = 8\nmemory_bandwidth_bytes_per_s = 1e11\npeak_flops = {fp32 = 1e12}\n"
    path.write_text(fine + "\n[bad]\n" + body)
    with pytest.raises(ValueError) as info:
        load_devices(path)
    message = str(info.value)
    assert str(path) in message and "[bad]" in message
    for fragment in fragments:
        assert fragment in message
    with pytest.raises(ValueError, match="unknown device"):
        get_device("fine")  # nothing of a broken file is registered


def test_load_devices_rejects_invalid_toml_and_missing_files(tmp_path):
    path = tmp_path / "invalid.toml"
    path.write_text("[gpu\nmemory_gib = ")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_devices(path)
    with pytest.raises(ValueError, match="cannot read"):
        load_devices(tmp_path / "missing.toml")


# --------------------------------------------------------------------------- host CPU


def test_cpu_device_reports_host_ram_and_measured_throughput():
    cpu = cpu_device()
    assert cpu.kind == "cpu" and cpu.name == "cpu"
    assert cpu.memory_bytes == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert cpu.flops_for(torch.float32) > 1e8 and cpu.flops_for(torch.bfloat16) > 1e8
    assert cpu.memory_bandwidth_bytes_per_s > 1e8
    assert not cpu.has_nvlink and "measured" in cpu.source
    assert cpu_device() is cpu and get_device("cpu") is cpu and get_device("CPU") is cpu


def test_uncalibrated_cpu_uses_documented_defaults():
    cpu = cpu_device(calibrate=False)
    assert cpu.peak_flops == {"fp32": devices.CPU_DEFAULT_FLOPS, "bf16": devices.CPU_DEFAULT_FLOPS}
    assert cpu.memory_bandwidth_bytes_per_s == devices.CPU_DEFAULT_MEMORY_BANDWIDTH_BYTES_PER_S
    assert cpu_device(calibrate=False) is cpu
