"""Pruning with several processes: shared calibration and solves (:mod:`.parallel`), weights partitioned by
DeepSpeed ZeRO stage 3 (:mod:`.zero`), and Lightning's DeepSpeed strategy on CPU processes (:mod:`.strategies`,
imported on its own: it needs Lightning)."""

from .parallel import DistributedPruningError, Processes, processes_for

__all__ = ["DistributedPruningError", "Processes", "processes_for"]
