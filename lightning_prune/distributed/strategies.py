"""DeepSpeed on CPU-only machines: Lightning's ``DeepSpeedStrategy`` with its CUDA-only checks removed.

Lightning's :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` refuses any accelerator but CUDA, while
DeepSpeed itself runs ZeRO (stages 1–3, parameter partitioning included) on CPUs over the ``gloo`` backend.
:class:`DeepSpeedCPUStrategy` is that strategy for ``Trainer(accelerator="cpu", devices=N)``: CPU-only clusters and
tests. On CUDA machines use Lightning's own ``DeepSpeedStrategy`` (``strategy="deepspeed_stage_3"``).

Example::

    from lightning.pytorch import Trainer
    from lightning_prune.distributed.strategies import DeepSpeedCPUStrategy

    trainer = Trainer(accelerator="cpu", devices=2, strategy=DeepSpeedCPUStrategy(stage=3))

or, in a LightningCLI config, ``strategy: deepspeed_cpu_stage_3`` (registered when this module is imported, which
``import lightning_prune.callbacks`` and the ``lightning-prune`` command line do).
Launch one process per device yourself (``torchrun --nproc_per_node 2 ...``) or let Lightning start them.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, StrategyRegistry
from typing_extensions import override

#: Name under which :class:`DeepSpeedCPUStrategy` with ZeRO stage 3 is registered with Lightning.
REGISTERED_NAME = "deepspeed_cpu_stage_3"


class DeepSpeedCPUStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` on CPU processes, communicating over ``gloo``.

    Takes every argument of :class:`~lightning.pytorch.strategies.DeepSpeedStrategy` (``stage``,
    ``offload_optimizer``, ``config``, …); ``process_group_backend`` defaults to ``"gloo"``. Sets
    ``DS_ACCELERATOR=cpu`` (unless already set) so that DeepSpeed picks its CPU accelerator.

    Differences from the parent: the accelerator may be Lightning's CPU accelerator (the parent raises for anything
    but CUDA) and devices are not validated as GPU indices. Everything else — the ZeRO config, the engine, sharded
    checkpoints — is the parent's.
    """

    strategy_name = REGISTERED_NAME

    def __init__(self, *args: Any, process_group_backend: str | None = "gloo", **kwargs: Any) -> None:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        super().__init__(*args, process_group_backend=process_group_backend, **kwargs)

    @override
    def setup_environment(self) -> None:
        # the parent raises unless the accelerator is CUDA; DDP's environment setup is what it runs after its check
        DDPStrategy.setup_environment(self)

    @override
    def setup_distributed(self) -> None:
        # the parent's sequence without its validation of the devices as CUDA indices
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    @override
    def root_device(self) -> torch.device:
        # DeepSpeed's engine reads the device index as the process's device rank: it must not be None
        return torch.device("cpu", self.local_rank)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: dict) -> None:
        strategy_registry.register(
            REGISTERED_NAME, cls, description="DeepSpeed ZeRO stage 3 on CPU processes (gloo)", stage=3
        )


if REGISTERED_NAME not in StrategyRegistry:
    DeepSpeedCPUStrategy.register_strategies(StrategyRegistry)
