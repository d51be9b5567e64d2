"""`python -m paced_entry ARGS`: ddp-train with every optimizer step 30 ms longer, its numbers unchanged.

A digits epoch takes about 0.1 s: a test that must act on a run before it ends (within the orphan watcher's 1 s
poll, say) needs the run to outlast that, on any machine.
"""

from __future__ import annotations

import sys
import time

from torch.optim.optimizer import register_optimizer_step_pre_hook

from ddp_trainer.cli import train

STEP_DELAY_S = 0.03

if __name__ == "__main__":
    register_optimizer_step_pre_hook(lambda *_: time.sleep(STEP_DELAY_S))
    sys.exit(train.main())
