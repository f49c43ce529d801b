"""The native decoder (native/, built by scripts/build-native): rinna's GPT-NeoX forward pass on CTranslate2's own
layers and ops, with a KV cache of ours, so rows join and leave a running batch at any step (the loop, loop.py).

CTranslate2 promises nothing about its layers and ops between versions, so before the engine trusts the decoder it
checks it against stock CTranslate2 on the same weights, device and compute type: a fixed prompt, stock's greedy
decode with its raw logits at each step, and ours fed the same tokens. A row alone runs the same operations as
stock (the prompt but its last token in one pass, then steps), so the logits agree to rounding; a library that
computes otherwise (another version, a changed layout) fails here, and the engine serves with static batches and
says why in one line. This module runs in the engine process only, which has CTranslate2 loaded (core.py).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

MODULE = "jachat.service.engine._native"
# A prompt of ordinary token ids (inside any vocabulary the converter writes), long enough to cross every layer's
# cache and the rotary table's first entries, and steps enough to append to the cache several times.
SELF_TEST_PROMPT = (1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000, 11000, 12000)
SELF_TEST_STEPS = 6


def tolerance(compute_type: str) -> float:
    """The largest difference of a logit allowed between our decoder and stock's, for one row alone: the same
    operations in the same order differ by rounding only (float32: measured below 1e-6); half precision rounds to
    about 1e-3 of a logit's size."""
    return 2e-2 if "16" in compute_type else 1e-4


@dataclasses.dataclass(frozen=True)
class Expectation:
    """What stock CTranslate2 computes for the self-test's prompt: its greedy tokens and each step's raw logits."""

    prompt: tuple[int, ...]
    tokens: tuple[int, ...]
    logits: Any  # numpy float32 [steps, vocabulary]


def module() -> Any:
    """The compiled module, or raises ImportError saying why (not built, or built against another library). The
    caller has imported ctranslate2, which loads the wheel's library: the module links it by its soname.
    JACHAT_NATIVE=off leaves it unused."""
    if os.environ.get("JACHAT_NATIVE") == "off":
        raise ImportError("JACHAT_NATIVE=off")
    return importlib.import_module(MODULE)


def expect(
    generator: Any, vocabulary: Sequence[str], on_host: Callable[[Any], Any] = lambda v: v, steps: int = SELF_TEST_STEPS
) -> Expectation:
    """Stock CTranslate2's greedy decode of the self-test prompt, with its raw logits (return_logits_vocab), which
    `on_host` brings to the CPU."""
    import numpy as np

    prompt = tuple(i % len(vocabulary) for i in SELF_TEST_PROMPT)
    result = generator.generate_batch(
        [[vocabulary[i] for i in prompt]],
        max_length=steps,
        sampling_topk=1,
        return_logits_vocab=True,
        include_prompt_in_result=False,
        end_token=[],
    )[0]
    logits = np.stack([np.asarray(on_host(step), dtype=np.float32) for step in result.logits[0]])  # one per step
    return Expectation(prompt, tuple(result.sequences_ids[0]), logits)


def check(decoder: Any, expected: Expectation, limit: float) -> str | None:
    """Why `decoder` disagrees with stock CTranslate2 (one line), or None: our logits for the same prompt, fed
    stock's tokens, within `limit` of stock's at every step. Leaves the decoder with no rows."""
    import numpy as np

    row = -1  # no call's row id is negative
    try:
        decoder.join(row, list(expected.prompt))
        ours = [decoder.step_array([token])[0] for token in (expected.prompt[-1], *expected.tokens[:-1])]
    finally:
        decoder.drop([row])
    got = np.stack(ours)
    if got.shape != expected.logits.shape:
        return f"logits of shape {got.shape} where stock CTranslate2 gives {expected.logits.shape}"
    diff = float(np.max(np.abs(got - expected.logits)))
    if not diff <= limit:  # NaN fails too
        step = int(np.argmax(np.max(np.abs(got - expected.logits), axis=1)))
        return f"logits differ from stock CTranslate2's by {diff:.3g} at step {step} (limit {limit:g})"
    return None


def start(
    model_dir: str, device: str, device_index: int, compute_type: str, intra_threads: int, expected: Expectation
) -> tuple[Any | None, str]:
    """The native decoder on these weights if it is built and agrees with stock CTranslate2, and one line saying
    so, or None and the line saying why not."""
    try:
        native = module()
    except ImportError as exc:
        return None, f"not built ({exc}; scripts/build-native builds it)"
    try:
        decoder = native.Decoder(model_dir, device, compute_type, device_index, intra_threads)
        mismatch = check(decoder, expected, tolerance(decoder.compute_type))
    except Exception as exc:  # a model or device it does not handle: say so, serve without it
        return None, f"cannot run this model: {type(exc).__name__}: {exc}"
    if mismatch is not None:
        return None, f"self-test failed: {mismatch}"
    return decoder, f"self-test passed against stock CTranslate2 ({len(expected.tokens)} steps at {compute_type})"
