from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jachat.converter.convert import ConversionError, ConvertOptions, convert
from jachat.manifest import MANIFEST_NAME, ManifestError, read_manifest, sha256_file, verify_manifest
from tests.helpers import REPO


def run_convert(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jachat.converter", *args], capture_output=True, text=True, timeout=600
    )


def test_output_folder_holds_model_tokenizer_and_manifest(model_int8: Path, demo_checkpoint: Path) -> None:
    assert sorted(p.name for p in model_int8.iterdir()) == sorted(
        ["config.json", "model.bin", "vocabulary.json", "spiece.model", MANIFEST_NAME]
    )
    assert (model_int8 / "spiece.model").read_bytes() == (demo_checkpoint / "spiece.model").read_bytes()
    manifest = read_manifest(model_int8)
    assert manifest.source == str(demo_checkpoint)
    assert manifest.quantization == "int8"
    assert manifest.shape.context_length == 2048 and manifest.shape.vocab_size == 32000
    assert {"ctranslate2", "transformers", "torch", "sentencepiece", "python"} <= set(manifest.tools)
    assert set(manifest.files) == {"config.json", "model.bin", "vocabulary.json", "spiece.model"}
    for name, digest in manifest.files.items():
        assert sha256_file(model_int8 / name) == digest
    verify_manifest(model_int8, manifest)


def test_vocabulary_is_spiece_models_own(model_int8: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_int8 / "spiece.model"))
    vocabulary = json.loads((model_int8 / "vocabulary.json").read_text())
    assert vocabulary == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    config = json.loads((model_int8 / "config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "[UNK]")


def test_manifest_detects_a_changed_file(model_int8: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model_int8, copy)
    with (copy / "model.bin").open("r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(ManifestError, match=r"model.bin: sha256 mismatch"):
        verify_manifest(copy, read_manifest(copy))


def test_same_weights_as_ctranslate2s_own_converter(demo_checkpoint: Path, model_f32: Path, tmp_path: Path) -> None:
    """Under the pinned transformers, wrapping CTranslate2's converter changes nothing in the weights."""
    upstream = tmp_path / "upstream"
    subprocess.run(
        [
            "ct2-transformers-converter",
            "--model",
            str(demo_checkpoint),
            "--output_dir",
            str(upstream),
            "--quantization",
            "float32",
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    assert sha256_file(upstream / "model.bin") == sha256_file(model_f32 / "model.bin")
    assert json.loads((upstream / "vocabulary.json").read_text()) == json.loads(
        (model_f32 / "vocabulary.json").read_text()
    )


def test_refuses_existing_output_without_force(demo_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_convert(str(demo_checkpoint), "--output", str(out))
    assert result.returncode == 1
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    result = run_convert(str(demo_checkpoint), "--output", str(out), "--force", "-q", "int8")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / MANIFEST_NAME).exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_refuses_a_checkpoint_that_is_not_gpt_neox(tmp_path: Path) -> None:
    src = tmp_path / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "architectures": ["GPT2LMHeadModel"],
                "n_layer": 1,
                "n_head": 1,
                "n_embd": 8,
                "vocab_size": 10,
            }
        )
    )
    with pytest.raises(ConversionError, match=r"not a GPT-NeoX checkpoint: found model_type 'gpt2'"):
        convert(ConvertOptions(source=str(src), output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unknown_quantization_lists_the_valid_ones(demo_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=r"int8, int8_float16, .*float32"):
        ConvertOptions(source=str(demo_checkpoint), output=tmp_path / "o", quantization="int4")
    result = run_convert(str(demo_checkpoint), "--output", str(tmp_path / "o"), "-q", "int4")
    assert result.returncode == 2 and "invalid choice: 'int4'" in result.stderr


def test_demo_checkpoint_looks_like_rinnas(demo_checkpoint: Path) -> None:
    import torch
    import transformers

    config = json.loads((demo_checkpoint / "config.json").read_text())
    assert config["model_type"] == "gpt_neox" and config["architectures"] == ["GPTNeoXForCausalLM"]
    assert {"rotary_pct", "rotary_emb_base", "use_parallel_residual", "max_position_embeddings"} <= set(config)
    tok = json.loads((demo_checkpoint / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "T5Tokenizer"
    model, info = transformers.GPTNeoXForCausalLM.from_pretrained(
        str(demo_checkpoint), dtype=torch.float32, output_loading_info=True
    )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(demo_checkpoint / "spiece.model"))
    assert [sp.id_to_piece(i) for i in range(4)] == ["[PAD]", "[UNK]", "<s>", "</s>"]
    assert sp.get_piece_size() == config["vocab_size"] == 32000
    trainer = sp.serialized_model_proto()
    assert b"[CLS]" in trainer and b"[SEP]" in trainer and b"[MASK]" in trainer
    del model


TF5 = os.environ.get("JACHAT_TF5_SITE")


@pytest.mark.slow
@pytest.mark.skipif(not TF5 and not os.environ.get("CI"), reason="JACHAT_TF5_SITE (transformers 5.x) not set")
def test_transformers_5_gives_the_same_model(demo_checkpoint: Path, model_f32: Path, tmp_path: Path) -> None:
    """CTranslate2 4.8.5's GPT-NeoX loader breaks on transformers 5.x; ours must not, and must agree."""
    assert TF5, "CI must set JACHAT_TF5_SITE to a folder with transformers 5.x installed (see .ci/run)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TF5, str(REPO)])}
    code = "import sys, transformers as t; print(t.__version__); sys.exit(0 if t.__version__ >= '5' else 3)"
    version = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert version.returncode == 0, version.stdout + version.stderr
    out = tmp_path / "tf5"
    result = subprocess.run(
        [sys.executable, "-m", "jachat.converter", str(demo_checkpoint), "--output", str(out), "-q", "float32"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert read_manifest(out).tools["transformers"].startswith("5.")
    assert sha256_file(out / "model.bin") == sha256_file(model_f32 / "model.bin")


def test_unreachable_hub_says_so_and_names_the_offline_demo(tmp_path: Path) -> None:
    """Runs offline here; with internet the hub id resolves, so only a plain unreachable hub is asserted."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_DISABLE_TELEMETRY": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jachat.converter",
            "rinna/japanese-gpt-neox-3.6b-instruction-ppo",
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1
    assert "cannot reach the Hugging Face hub" in result.stderr
    assert "JACHAT_DEMO=1 scripts/serve" in result.stderr and "jachat-convert --demo" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_demo_builder_is_reproducible(demo_checkpoint: Path, tmp_path: Path) -> None:
    from jachat.converter.demo import build_demo_checkpoint

    again = build_demo_checkpoint(tmp_path / "again")
    for name in ("spiece.model", "model.safetensors", "config.json", "tokenizer_config.json"):
        assert sha256_file(again / name) == sha256_file(demo_checkpoint / name), name
