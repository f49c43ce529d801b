"""Build a small random-weight checkpoint shaped like rinna's, offline.

It looks like `rinna/japanese-gpt-neox-3.6b-instruction-ppo` to every tool that reads it: a GPTNeoX `config.json`
with the same keys, safetensors weights under Hugging Face's names, a T5Tokenizer `tokenizer_config.json`, and a
`spiece.model` (unigram) trained with byte fallback, no dummy prefix and whitespace kept, whose special tokens are
`[PAD]`=0, `[UNK]`=1, `<s>`=2, `</s>`=3, `[CLS]`, `[SEP]`, `[MASK]`. Only the sizes (and the weights, random) differ,
unless asked: `DemoShape.full_size()` is rinna's own 3.6B shape.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from jachat.manifest import TOKENIZER_FILE

# sentencepiece's built-in rules, and "custom": CUSTOM_RULE, a table that maps the usual full-width and
# look-alike replacements for "<", ">" and ":" back to ASCII (as a stricter normalizer might), so that tests can
# check that the injection defence adapts to a rule it has never seen.
NORMALIZATIONS = ("identity", "nmt_nfkc", "nfkc", "nmt_nfkc_cf", "nfkc_cf", "custom")
CUSTOM_RULE = {"＜": "<", "＞": ">", "〈": "<", "〉": ">", "：": ":", "꞉": ":", "∶": ":", "\u3000": " "}
SPECIAL_PIECES = ("[PAD]", "[UNK]", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]")
NEWLINE_PIECE = "<NL>"

# Text the demo tokenizer is trained on: the model card's conversation and everyday Japanese.
_CORPUS = """\
コンタクトレンズを慣れるにはどうすればよいですか?
これについて具体的に説明していただけますか?何が難しいのでしょうか?
目が痛いのです。
分かりました、コンタクトレンズをつけると目がかゆくなるということですね。思った以上にレンズを外す必要があるでしょうか?
いえ、レンズは外しませんが、目が赤くなるんです。
それは、コンタクトレンズが目に合わないために起こることがあります。レンズが目の表面に長時間触れ続けることが原因となることがあります。
また、コンタクトレンズが汚れている可能性もあります。コンタクトレンズケースを定期的に洗浄したり、正しくフィットさせるようにしたりすることが役立ちます。
吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。何でも薄暗いじめじめした所でニャーニャー泣いていた事だけは記憶している。
今日はとても良い天気ですね。明日は雨が降るそうです。傘を持って出かけましょう。
日本の首都は東京です。大阪や京都、名古屋、福岡、札幌も大きな都市です。
おすすめの本を教えてください。最近は小説よりもエッセイをよく読みます。
朝ごはんにパンとコーヒーを食べました。昼ごはんはラーメンにしようと思います。
プログラミングを勉強したいのですが、何から始めればよいでしょうか?
Pythonはわかりやすい言語です。まずは簡単なスクリプトを書いてみましょう。
ありがとうございます。とても参考になりました。また質問してもいいですか?
もちろんです。いつでもどうぞ。お役に立ててうれしいです。
ユーザー: こんにちは<NL>システム: こんにちは、何かお手伝いできることはありますか?
The quick brown fox jumps over the lazy dog. Hello, world! 123 456 7890
東京タワーの高さは三百三十三メートルです。富士山は日本で一番高い山です。
"""


@dataclass(frozen=True)
class DemoShape:
    """Sizes of the demo model. The defaults make a tiny, fast model with rinna's vocabulary size."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    vocab_size: int = 32000
    context_length: int = 2048
    dtype: str = "float32"  # float32 or float16 (rinna ships float16)
    newline_piece: bool = True  # whether "<NL>" is one piece of the vocabulary
    normalization: str = "identity"  # spiece.model's normalization rule: one of NORMALIZATIONS
    seed: int = 0

    @classmethod
    def full_size(cls) -> DemoShape:
        """rinna/japanese-gpt-neox-3.6b-instruction-ppo's own shape (3.6B parameters, float16)."""
        return cls(hidden_size=2816, num_layers=36, num_heads=22, vocab_size=32000, dtype="float16")

    def config(self) -> dict[str, object]:
        """config.json with the keys of rinna's checkpoint."""
        return {
            "architectures": ["GPTNeoXForCausalLM"],
            "bos_token_id": 2,
            "eos_token_id": 3,
            "hidden_act": "gelu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": 4 * self.hidden_size,
            "layer_norm_eps": 1e-05,
            "max_position_embeddings": self.context_length,
            "model_type": "gpt_neox",
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "rotary_emb_base": 10000,
            "rotary_pct": 1.0,
            "tie_word_embeddings": False,
            "torch_dtype": self.dtype,
            "use_cache": True,
            "use_parallel_residual": False,
            "vocab_size": self.vocab_size,
        }


def train_tokenizer(output: Path, vocab_size: int, newline_piece: bool = True, normalization: str = "identity") -> Path:
    """Train spiece.model like rinna's, then pad it with CJK pieces to exactly vocab_size pieces."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    if normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization rule {normalization!r}; choose one of: {', '.join(NORMALIZATIONS)}")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(_CORPUS, encoding="utf-8")
        prefix = Path(tmp) / "spiece"
        rule: dict[str, Any] = {"normalization_rule_name": normalization}
        if normalization == "custom":
            table = Path(tmp) / "rule.tsv"
            table.write_text("".join(f"{ord(a):X}\t{ord(b):X}\n" for a, b in CUSTOM_RULE.items()))
            rule = {"normalization_rule_tsv": str(table)}
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(prefix),
            model_type="unigram",
            vocab_size=min(vocab_size, 600),
            hard_vocab_limit=False,
            character_coverage=1.0,
            byte_fallback=True,
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_by_whitespace=True,
            **rule,
            pad_id=0,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            pad_piece=SPECIAL_PIECES[0],
            unk_piece=SPECIAL_PIECES[1],
            bos_piece=SPECIAL_PIECES[2],
            eos_piece=SPECIAL_PIECES[3],
            control_symbols=list(SPECIAL_PIECES[4:]),
            user_defined_symbols=[NEWLINE_PIECE] if newline_piece else [],
            minloglevel=2,
        )
        proto = model_pb2.ModelProto()  # type: ignore[attr-defined]
        proto.ParseFromString(prefix.with_suffix(".model").read_bytes())
    del proto.trainer_spec.input[:]  # temporary paths: drop them so the same options give the same file
    proto.trainer_spec.model_prefix = "spiece"
    proto.normalizer_spec.normalization_rule_tsv = ""
    if normalization == "custom":
        proto.normalizer_spec.name = "custom"
    _pad_vocabulary(proto, vocab_size)
    path = output / TOKENIZER_FILE
    path.write_bytes(proto.SerializeToString())
    return path


def _pad_vocabulary(proto: object, vocab_size: int) -> None:
    pieces = proto.pieces  # type: ignore[attr-defined]
    if len(pieces) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the trained vocabulary ({len(pieces)} pieces)")
    known = {p.piece for p in pieces}
    score = min(p.score for p in pieces if p.type == 1) - 1.0
    cjk = [chr(c) for c in range(0x4E00, 0x9FA0)] + [chr(c) for c in range(0x3041, 0x3097)]
    candidates = iter(cjk + [a + b for a in cjk[:400] for b in cjk[:400]])
    while len(pieces) < vocab_size:
        piece = next(candidates)
        if piece in known:
            continue
        known.add(piece)
        new = pieces.add()
        new.piece, new.score, new.type = piece, score, 1  # NORMAL
        score -= 1e-3


def tokenizer_files() -> dict[str, dict[str, object]]:
    """tokenizer_config.json and special_tokens_map.json as rinna publishes them (T5Tokenizer, slow)."""
    special = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "[UNK]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }
    config: dict[str, object] = {
        "tokenizer_class": "T5Tokenizer",
        "do_lower_case": False,
        "extra_ids": 0,
        "additional_special_tokens": [],
        "sp_model_kwargs": {},
        "model_max_length": 2048,
        "legacy": True,
        **special,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": dict(special)}


def _weights(shape: DemoShape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every tensor, in Hugging Face's GPTNeoXForCausalLM names."""
    h, v = shape.hidden_size, shape.vocab_size
    tensors: list[tuple[str, tuple[int, ...], str]] = [("gpt_neox.embed_in.weight", (v, h), "normal")]
    for i in range(shape.num_layers):
        p = f"gpt_neox.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", (h,), "ones"),
            (p + "input_layernorm.bias", (h,), "zeros"),
            (p + "post_attention_layernorm.weight", (h,), "ones"),
            (p + "post_attention_layernorm.bias", (h,), "zeros"),
            (p + "attention.query_key_value.weight", (3 * h, h), "normal"),
            (p + "attention.query_key_value.bias", (3 * h,), "small"),
            (p + "attention.dense.weight", (h, h), "normal"),
            (p + "attention.dense.bias", (h,), "small"),
            (p + "mlp.dense_h_to_4h.weight", (4 * h, h), "normal"),
            (p + "mlp.dense_h_to_4h.bias", (4 * h,), "small"),
            (p + "mlp.dense_4h_to_h.weight", (h, 4 * h), "normal"),
            (p + "mlp.dense_4h_to_h.bias", (h,), "small"),
        ]
    tensors += [
        ("gpt_neox.final_layer_norm.weight", (h,), "ones"),
        ("gpt_neox.final_layer_norm.bias", (h,), "zeros"),
        ("embed_out.weight", (v, h), "normal"),
    ]
    return tensors


def write_weights(output: Path, shape: DemoShape, shard_bytes: int = 2 << 30) -> None:
    """Random weights (normal, std 0.02 as Hugging Face initialises) as sharded safetensors with an index."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(shape.seed)
    dtype = np.dtype(shape.dtype)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, dims, init in _weights(shape):
        if init == "ones":
            array = np.ones(dims, dtype=dtype)
        elif init == "zeros":
            array = np.zeros(dims, dtype=dtype)
        else:
            std = 0.02 if init == "normal" else 0.002
            array = (rng.standard_normal(dims, dtype=np.float32) * std).astype(dtype)
        if size and size + array.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(output / "model.safetensors"), metadata=metadata)
        return
    weight_map = {}
    total = 0
    for index, tensors in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(output / filename), metadata=metadata)
        for name, array in tensors.items():
            weight_map[name] = filename
            total += array.nbytes
        tensors.clear()
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (output / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")


def build_demo_checkpoint(output: Path, shape: DemoShape | None = None, force: bool = False) -> Path:
    """Write a rinna-shaped random-weight Hugging Face checkpoint into output; returns output."""
    shape = shape or DemoShape()
    if shape.hidden_size % shape.num_heads:
        raise ValueError(f"hidden_size {shape.hidden_size} is not a multiple of num_heads {shape.num_heads}")
    if shape.dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be one of float32, float16; got {shape.dtype!r}")
    output = Path(output)
    if output.exists() and any(output.iterdir()) and not force:
        raise FileExistsError(f"{output} exists and is not empty (use --force to overwrite)")
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    for name, content in tokenizer_files().items():
        (output / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    train_tokenizer(output, shape.vocab_size, shape.newline_piece, shape.normalization)
    write_weights(output, shape)
    (output / "README.md").write_text(
        "Random-weight checkpoint shaped like rinna/japanese-gpt-neox-3.6b-instruction-ppo, built by "
        "`jachat-convert --demo`. Its replies are noise: it exists to test the pipeline offline.\n"
    )
    return output
