"""Tensor-parallel layouts per node: DTensor's own strategies, priced and chosen (a plan is data).

    layouts = node_layouts(traced.graph_module, tp=2)                   # strategies.py
    choice = choose_layouts(traced, price_graph(traced.graph_module),   # choose.py
                            Cluster.parse("2xh100"), ranks=[0, 1])
    priced = price_layouts(traced.graph_module, costs, choice.layouts, cluster, [0, 1])   # price.py
"""

from autosplit.sharding.choose import ShardingChoice, choose_layouts
from autosplit.sharding.placements import from_placement, to_placement
from autosplit.sharding.price import Collective, ShardingCost, price_layouts
from autosplit.sharding.strategies import Layout, NodeLayouts, cpu_attention_strategy, node_layouts

__all__ = ["Collective", "Layout", "NodeLayouts", "ShardingChoice", "ShardingCost", "choose_layouts",
           "cpu_attention_strategy", "from_placement", "node_layouts", "price_layouts", "to_placement"]
