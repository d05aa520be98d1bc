"""cost_models: what every op of a traced graph costs on every device of a cluster.

A package of its own beside ``autosplit``: it reads torch.fx graphs whose nodes carry
``meta["val"]`` and never imports autosplit.

    costs = price_graph(traced.graph_module)               # FLOPs, bytes, kernels, saved tensors
    times = AnalyticCostModel().times(costs, get_device("h100"))
    cluster = Cluster.parse("2x8xh100")
    all_reduce_s(cluster, range(8), 2 * 2**30)
"""

from cost_models.analytic import AnalyticCostModel, Efficiency, OpTime, Sample
from cost_models.cluster import Cluster, Link
from cost_models.collectives import (
    all_gather_s,
    all_reduce_s,
    all_to_all_s,
    broadcast_s,
    reduce_scatter_s,
    send_recv_s,
    sharded_data_parallel_s,
)
from cost_models.devices import (
    PRECISIONS,
    DeviceSpec,
    cpu_device,
    get_device,
    list_devices,
    load_devices,
    register_device,
)
from cost_models.memory import (
    MemoryBreakdown,
    activation_bytes,
    kv_cache_bytes,
    microbatches_in_flight,
    stage_memory,
    training_state_bytes,
    weight_bytes,
)
from cost_models.ops import OpCost, price_graph
from cost_models.profiled import ProfiledCostModel
from cost_models.symbolic import SymbolicCost, SymbolicCosts, price_at, symbolic_costs

__all__ = [
    "PRECISIONS",
    "AnalyticCostModel",
    "Cluster",
    "DeviceSpec",
    "Efficiency",
    "Link",
    "MemoryBreakdown",
    "OpCost",
    "OpTime",
    "ProfiledCostModel",
    "Sample",
    "SymbolicCost",
    "SymbolicCosts",
    "activation_bytes",
    "all_gather_s",
    "all_reduce_s",
    "all_to_all_s",
    "broadcast_s",
    "cpu_device",
    "get_device",
    "kv_cache_bytes",
    "list_devices",
    "load_devices",
    "microbatches_in_flight",
    "price_at",
    "price_graph",
    "reduce_scatter_s",
    "register_device",
    "send_recv_s",
    "sharded_data_parallel_s",
    "stage_memory",
    "symbolic_costs",
    "training_state_bytes",
    "weight_bytes",
]
