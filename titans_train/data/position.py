"""The loader's checkpointable state: one global sample count, plus a data fingerprint."""

from __future__ import annotations

from dataclasses import dataclass

from titans_train.data.errors import DataError

STATE_VERSION = 1
# The mix of a state saved without one: every loader state written before mixes existed read the
# sources' slots in the uniform shuffle (order.py), so resuming one must keep it.
LEGACY_MIX = "shuffled"


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
    mix: str = LEGACY_MIX  # how the loader orders the slots of several sources (order.MIXES)
    mix_applies: bool = True  # False: one source, whose order is the same under every mix

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "samples": int(self.samples),
            "epoch": int(self.epoch),
            "fingerprint": self.fingerprint,
            "mix": self.mix,
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        if state.get("version") != STATE_VERSION or not isinstance(state.get("samples"), int):
            raise DataError(f"unrecognised loader state {state!r}")
        saved_mix = state.get("mix", LEGACY_MIX)
        if strict and self.mix_applies and saved_mix != self.mix:
            raise DataError(
                f"loader state was saved with mix={saved_mix!r} but this loader orders its "
                f"sources with mix={self.mix!r}, another order; pass mix={saved_mix!r} "
                f"(data.mix={saved_mix}) to resume it, or strict=False to continue anyway"
            )
        if strict and state.get("fingerprint") != self.fingerprint:
            raise DataError(
                f"loader state was saved for data/order {state.get('fingerprint')!r} but this "
                f"loader reads {self.fingerprint!r} (other manifests, weights, seed, split, "
                "interleave or mix); pass strict=False to continue anyway"
            )
        self.samples = state["samples"]
        self.epoch = int(state.get("epoch", 0))
