"""A row's logits alone against the same row joining two running rows, on the loop's native decoder: how far a
batch's kernels round apart (README, Sampling: seeds). Run from the repository root with the venv:
    python docs/benchmarks/2026-12-08-batch-rounding.py models/bench-f32     (and models/bench-int8)
Measured 2026-12-08 (Intel Xeon @ 2.80GHz 2-core, CTranslate2 4.8.5 AVX2 + MKL), one thread: float32 3.1e-6 to
3.8e-6 per step, int8 1.5e-2 to 2.1e-2, the same before and after the cache's spare columns; no step bitwise equal.
"""

import sys
from pathlib import Path

import numpy as np

from jachat.bench.workload import Workload
from jachat.manifest import TOKENIZER_FILE, read_manifest
from jachat.service.engine import native
from jachat.service.text.tokenizer import Tokenizer

model = Path(sys.argv[1])
decoder = native.module().Decoder(str(model), "cpu", read_manifest(model).quantization, 0, 1)
tokenizer = Tokenizer(model / TOKENIZER_FILE)
a, b, c = (tokenizer.encode(Workload().prompt(i)) for i in (0, 1, 2))
fed = [5 + i for i in range(30)]

decoder.join(1, a)
alone, token = [], a[-1]
for following in fed:
    alone.append(np.array(decoder.step_array([token])[0]))
    token = following
decoder.reset()

decoder.join(2, b)
decoder.join(3, c)
for _ in range(5):
    decoder.step_array([7, 8])
decoder.join(1, a)
beside, token = [], a[-1]
for following in fed:
    beside.append(np.array(decoder.step_array([9, 10, token])[2]))
    token = following

diffs = [float(np.max(np.abs(x - y))) for x, y in zip(alone, beside, strict=True)]
print("max abs diff per step:", [f"{d:.1e}" for d in diffs[:12]], f"bitwise equal: {sum(d == 0 for d in diffs)}/30")
