"""Pipeline parallelism over slow, unequal links (docs/pipelines.md).

* schedules.py, timeline.py, plots.py: GPipe and 1F1B, with and without 2BP, as a time model
  (step time, bubble, Gantt chart, micro-batches held per stage).
* matching.py, path.py, placement.py, search.py, scenarios.py, plan.py, cli.py: Yuan et
  al.'s decentralized scheduler (`loco place`), its five network scenarios, and the
  simulation of a placement with the time model.
* stages.py, inprocess.py: the char GPT cut into stages, 2BP's split backward for real, run
  in one process and checked against plain backprop.
* distributed.py, stage_process.py, spawn.py: the same stages, one process per stage over
  torch.distributed (gloo or NCCL), running the time model's order, measured and compared
  with the model.

Modules that need torch (stages, inprocess, distributed, stage_process, spawn) are not
imported here, so `loco place` and the time model start without it.
"""
