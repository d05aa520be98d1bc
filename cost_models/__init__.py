"""cost_models: prices of graph nodes on target devices (FLOPs, bytes, time, memory).

A package of its own beside ``autosplit``: it reads plain graph data and never imports autosplit.
"""
