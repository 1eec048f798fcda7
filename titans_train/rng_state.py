"""Every RNG state of a process as plain JSON, and back, without unpickling anything.

``trainer_state.json`` is data, not code: a checkpoint copied from elsewhere must not be able to
run a command on resume. States are therefore stored as JSON numbers and base64 of the raw
generator bytes (format ``plain-v2``). Checkpoints written before that (format
``torch.save+base64``, a pickle) are read with ``torch.load(weights_only=True)`` and only numpy's
array reconstruction allowed, which is enough for a genuine RNG pickle; anything else in such a
blob (a crafted ``__reduce__``) is refused before it runs.
"""

from __future__ import annotations

import base64
import io
import random

import numpy as np
import torch

FORMAT = "plain-v2"
LEGACY_FORMAT = "torch.save+base64"


class RngStateError(ValueError):
    """An RNG state that cannot be restored safely; the message says why."""


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def capture() -> dict:
    """This process's RNG states (torch CPU/CUDA, numpy, python) as JSON-able values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    cuda = [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None
    return {
        "format": FORMAT,
        "torch": _b64(torch.get_rng_state()),
        "cuda": cuda,
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }


def _decode_plain(state: dict) -> dict:
    kind, keys, pos, has_gauss, cached = state["numpy"]
    version, internal, gauss_next = state["python"]
    if not all(isinstance(x, int) for x in internal):
        raise RngStateError("python state holds non-integers")
    return {
        "torch": _bytes_tensor(state["torch"]),
        "cuda": None if state["cuda"] is None else [_bytes_tensor(s) for s in state["cuda"]],
        "numpy": (str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), cached),
        "python": (int(version), tuple(internal), gauss_next),
    }


def _decode_legacy(state: dict) -> dict:
    blob = io.BytesIO(base64.b64decode(state["data"], validate=True))
    # What a genuine legacy blob needs beyond tensors and containers: numpy's MT19937 key array.
    allowed = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(blob, weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise RngStateError(f"not a plain RNG pickle, refused unread ({first[:200]})") from e


def decode(state: dict) -> dict:
    """A stored state -> the values ``restore`` applies; RngStateError if it is not safe/valid."""
    if not isinstance(state, dict):
        raise RngStateError(f"expected an object, got {type(state).__name__}")
    fmt = state.get("format")
    try:
        if fmt == FORMAT:
            return _decode_plain(state)
        if fmt == LEGACY_FORMAT:
            return _decode_legacy(state)
    except RngStateError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise RngStateError(f"malformed {fmt} state ({type(e).__name__}: {e})") from e
    raise RngStateError(f"unknown format {fmt!r}")


def restore(values: dict) -> None:
    """Apply what ``decode`` returned; RngStateError when a generator rejects its state."""
    try:
        torch.set_rng_state(values["torch"])
        if values["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(values["cuda"])
        np.random.set_state(values["numpy"])
        random.setstate(values["python"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise RngStateError(f"a generator rejected the state ({type(e).__name__}: {e})") from e
