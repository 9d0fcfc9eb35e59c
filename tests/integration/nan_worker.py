"""``train.py`` with the loss of one optimizer step made NaN: fault injection patched in from
outside, so the training loop carries no test hook.

    python -m tests.integration.nan_worker STEPS [train.py arguments ...]   (from the repo root)

``STEPS``: comma-separated step numbers (1-based, as the console and the logs number them);
every micro-batch loss of those steps becomes NaN (on every rank), as a real overflow would.
"""

from __future__ import annotations

import sys


def main() -> int:
    import train
    from lang_jepa.trainer import Trainer

    faulty, original = {int(x) for x in sys.argv[1].split(",")}, Trainer.train_step

    def train_step(self: Trainer, micro_batches: list) -> object:
        if self.step + 1 not in faulty:  # self.step: steps done before this one
            return original(self, micro_batches)
        loss_of = self.objective.loss

        def nan_loss(eng: object, batch: dict) -> tuple:
            loss, outputs = loss_of(eng, batch)
            return loss * float("nan"), outputs

        self.objective.loss = nan_loss
        try:
            return original(self, micro_batches)
        finally:
            del self.objective.loss  # the class's method again

    Trainer.train_step = train_step
    return train.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
