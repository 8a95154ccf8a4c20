"""``normswap`` under a launcher, with a fault planted on one rank: ``FAULT_RANK`` (the rank that fails) and
``FAULT_AT`` (``loading``: the model fails to load, before any collective; ``training``: the third training
step raises, while the other ranks wait in DDP's gradient all-reduce; ``sampling``: sampling the teacher's texts
raises, which only rank 0 may do). Run as
``torchrun --nproc_per_node 2 tests/launch_runner.py heal ...``."""

from __future__ import annotations

import os

from normswap.cli import main
from normswap.errors import NormswapError
from normswap.process_exit import exit_without_teardown

if os.environ.get("RANK") == os.environ.get("FAULT_RANK"):
    if os.environ.get("FAULT_AT") == "loading":
        from normswap.healing import checkpoint

        def refuse(*args: object, **kwargs: object) -> None:
            raise NormswapError(f"planted fault on rank {os.environ['RANK']} while loading")

        checkpoint.load_model = refuse
    elif os.environ.get("FAULT_AT") == "training":
        from normswap.healing.objective import HealingObjective

        forward = HealingObjective.forward
        steps = iter(range(1_000_000))

        def failing(self: HealingObjective, *args: object, **kwargs: object) -> object:
            if next(steps) == 2:
                raise RuntimeError(f"planted fault on rank {os.environ['RANK']} while training")
            return forward(self, *args, **kwargs)

        HealingObjective.forward = failing
    elif os.environ.get("FAULT_AT") == "sampling":
        from normswap.healing import teacher_texts

        def sampled(*args: object, **kwargs: object) -> None:
            raise NormswapError(f"planted fault: rank {os.environ['RANK']} sampled the teacher's texts")

        teacher_texts.sample_texts = sampled

exit_without_teardown(main())
