"""Benchmark only: a rinna-shaped Hugging Face checkpoint (jachat-convert --demo, or rinna's own) as a GGUF file for
llama.cpp, with llama.cpp's own converter (the copy vendored in llama-cpp-python's sdist).

llama.cpp converts GPT-NeoX with a GPT-2 (BPE) vocabulary; rinna's is sentencepiece, so its vocabulary is written
as llama.cpp writes a sentencepiece one (`tokenizer.ggml.model = llama`), from `spiece.model` under the name the
converter looks for. Nothing else is changed. Run by scripts/llama-server-baseline; never by the tests.

usage: python scripts/llama_gguf.py LLAMA_CPP_DIR CHECKPOINT OUTPUT.gguf
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path


def main(llama_cpp: Path, checkpoint: Path, output: Path) -> None:
    sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    import convert_hf_to_gguf  # type: ignore[import-not-found]
    from conversion.base import TextModel  # type: ignore[import-not-found]
    from conversion.gptneox import GPTNeoXModel  # type: ignore[import-not-found]

    GPTNeoXModel.set_vocab = TextModel._set_vocab_sentencepiece
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / checkpoint.name
        shutil.copytree(checkpoint, copy)
        shutil.copy(copy / "spiece.model", copy / "tokenizer.model")
        sys.argv = ["convert_hf_to_gguf.py", str(copy), "--outfile", str(output), "--outtype", "f16"]
        convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
