"""`loco plan`: the algorithm files on phantom compute, for clusters far bigger than this
machine (docs/planner.md).

* phantom.py: tensors with sizes and no values, and the phantom workload;
* plan.py: one plan (an algorithm on a cluster), representatives, compute utilisation;
* bandwidth.py: the bandwidth at which compute utilisation reaches a target;
* papers.py: the Streaming DiLoCo and eager-updates papers' bandwidth tables;
* cli.py: the command (`add_parser`, `cmd_plan`).
"""
