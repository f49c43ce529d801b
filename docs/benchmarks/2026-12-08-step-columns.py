"""One decode step of 16 rows on the loop's native decoder as the cache grows, and a join into those 16 rows
(README, "On the CPU the cache grows in place"). Run from the repository root with the venv:
    python docs/benchmarks/2026-12-08-step-columns.py models/bench-int8
Measured 2026-12-08 (Intel Xeon @ 2.80GHz 2-core, CTranslate2 4.8.5 AVX2 + MKL, 2 threads), the bench model in int8:
before the spare columns, 21.5 / 20.9 / 23.6 / 26.6 / 30.0 / 32.6 ms a step at 67 to 167 columns and a join 41 ms;
after them and the free row slots, 18.8 / 14.6 / 15.0 / 17.8 / 18.7 / 19.3 ms (the join pays its row's slot growth).
"""

import sys
import time
from pathlib import Path

from jachat.bench.workload import Workload
from jachat.manifest import TOKENIZER_FILE, read_manifest
from jachat.service.engine import native
from jachat.service.text.tokenizer import Tokenizer

model = Path(sys.argv[1])
decoder = native.module().Decoder(str(model), "cpu", read_manifest(model).quantization, 0, 2)
tokenizer = Tokenizer(model / TOKENIZER_FILE)
prompts = [tokenizer.encode(Workload().prompt(i)) for i in range(16)]
for row, prompt in enumerate(prompts):
    decoder.join(row, prompt)
tokens = [prompt[-1] for prompt in prompts]
for _ in range(6):
    started = time.perf_counter()
    for _ in range(20):
        decoder.step_array(tokens)
    print(f"{decoder.cache_columns} columns: {(time.perf_counter() - started) / 20 * 1000:.2f} ms a step")
started = time.perf_counter()
decoder.join(100, prompts[0])
print(f"a join into 16 rows: {(time.perf_counter() - started) * 1000:.1f} ms")
