"""The loader's checkpointable state: one global sample count, plus a data fingerprint."""

from __future__ import annotations

from dataclasses import dataclass

from titans_train.data.errors import DataError

STATE_VERSION = 1


@dataclass
class LoaderPosition:
    """Samples consumed by all ranks together since the start of training.

    This single integer is the whole state: the order is a pure function of (seed, epoch,
    position), so any world size, micro-batch split or worker count can continue from it. The
    fingerprint names the data and order parameters, so a resume onto other data is refused.
    """

    samples: int = 0
    fingerprint: str = ""
    epoch: int = 0  # informational: derived from `samples`, stored for humans reading checkpoints

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "samples": int(self.samples),
            "epoch": int(self.epoch),
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        if state.get("version") != STATE_VERSION or not isinstance(state.get("samples"), int):
            raise DataError(f"unrecognised loader state {state!r}")
        if strict and state.get("fingerprint") != self.fingerprint:
            raise DataError(
                f"loader state was saved for data/order {state.get('fingerprint')!r} but this "
                f"loader reads {self.fingerprint!r} (other manifests, weights, seed, split or "
                "interleave); pass strict=False to continue anyway"
            )
        self.samples = state["samples"]
        self.epoch = int(state.get("epoch", 0))
