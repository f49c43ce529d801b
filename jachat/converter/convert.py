"""Conversion: a Hugging Face GPT-NeoX checkpoint -> CTranslate2 model folder + spiece.model + manifest.

CTranslate2's own Transformers converter does the weight mapping (template method: we override only the steps
that differ). What we change:
- the vocabulary and special tokens come from `spiece.model` itself, not from a Transformers tokenizer (whose
  slow/fast behaviour changed across versions);
- rotary settings and the output projection are read in a way that works with Transformers 4.x (`rotary_pct`,
  `rotary_emb_base`, `embed_out`) and 5.x (`rope_parameters`, `lm_head`), where CTranslate2 4.8.5 breaks on 5.x;
- only GPT-NeoX checkpoints are accepted, safetensors are preferred, remote code is never trusted unless asked;
- the output is written to a temporary sibling folder and moved into place only when complete, with a manifest.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from jachat.manifest import TOKENIZER_FILE, Manifest, ModelShape, checksum_folder, write_manifest

log = logging.getLogger("jachat.converter")

DEFAULT_SOURCE = "rinna/japanese-gpt-neox-3.6b-instruction-ppo"
QUANTIZATIONS = ("int8", "int8_float16", "int8_bfloat16", "int8_float32", "float16", "bfloat16", "float32")
T = TypeVar("T")


class ConversionError(Exception):
    """The checkpoint cannot be converted; the message says why and what was found."""


@dataclass(frozen=True)
class ConvertOptions:
    source: str
    output: Path
    quantization: str = "int8"
    revision: str | None = None
    force: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise ConversionError(
                f"unknown quantization {self.quantization!r}; choose one of: {', '.join(QUANTIZATIONS)}"
            )


class SentencePieceVocabulary:
    """What CTranslate2's loaders ask of a tokenizer, answered from spiece.model itself."""

    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self.processor = spm.SentencePieceProcessor(model_file=str(path))
        self.pieces = [self.processor.id_to_piece(i) for i in range(self.processor.get_piece_size())]

    def _piece(self, token_id: int) -> str:
        if token_id < 0:
            raise ConversionError("spiece.model lacks a special token that the model needs (<s>, </s>, unk)")
        return self.pieces[token_id]

    @property
    def bos_token(self) -> str:
        return self._piece(self.processor.bos_id())

    @property
    def eos_token(self) -> str:
        return self._piece(self.processor.eos_id())

    @property
    def unk_token(self) -> str:
        return self._piece(self.processor.unk_id())

    def get_vocab(self) -> dict[str, int]:
        return {piece: i for i, piece in enumerate(self.pieces)}


def _spec_loader() -> Any:
    """CTranslate2's GPT-NeoX loader, made independent of the Transformers major version."""
    from ctranslate2.converters.transformers import _SUPPORTED_ACTIVATIONS, GPTNeoXLoader
    from ctranslate2.specs import transformer_spec

    class GPTNeoXSpecLoader(GPTNeoXLoader):  # type: ignore[misc]
        def get_model_spec(self, model: Any) -> Any:
            config = model.config
            rope = getattr(config, "rope_parameters", None) or {}
            rotary_pct = rope.get("partial_rotary_factor", getattr(config, "rotary_pct", 1.0))
            rotary_base = rope.get("rope_theta", getattr(config, "rotary_emb_base", 10000))
            head_dim = config.hidden_size // config.num_attention_heads
            spec = transformer_spec.TransformerDecoderModelSpec.from_config(
                config.num_hidden_layers,
                config.num_attention_heads,
                pre_norm=True,
                activation=_SUPPORTED_ACTIVATIONS[config.hidden_act],
                rotary_dim=int(rotary_pct * head_dim),
                rotary_interleave=False,
                rotary_base=float(rotary_base),
                parallel_residual=config.use_parallel_residual,
                shared_layer_norm=False,
            )
            self.set_decoder(spec.decoder, model.gpt_neox, config.num_attention_heads)
            self.set_linear(spec.decoder.projection, model.get_output_embeddings())
            return spec

        def get_vocabulary(self, model: Any, tokenizer: SentencePieceVocabulary) -> list[str]:
            tokens = list(tokenizer.pieces)
            if len(tokens) > model.config.vocab_size:
                raise ConversionError(
                    f"spiece.model has {len(tokens)} pieces but the model's vocab_size is "
                    f"{model.config.vocab_size}: tokenizer and weights do not belong together"
                )
            tokens += [f"<extra_id_{i}>" for i in range(model.config.vocab_size - len(tokens))]
            return tokens

    return GPTNeoXSpecLoader()


def _converter_class() -> Any:
    from ctranslate2.converters.transformers import TransformersConverter

    class GPTNeoXConverter(TransformersConverter):  # type: ignore[misc]
        """TransformersConverter for GPT-NeoX, overriding only the loading step."""

        def __init__(self, options: ConvertOptions) -> None:
            super().__init__(
                options.source,
                revision=options.revision,
                low_cpu_mem_usage=True,
                trust_remote_code=options.trust_remote_code,
            )
            self.options = options
            self.config: Any = None

        def _load(self) -> Any:
            import torch
            import transformers

            with torch.no_grad():
                config = transformers.AutoConfig.from_pretrained(
                    self._model_name_or_path,
                    revision=self._revision,
                    trust_remote_code=self._trust_remote_code,
                )
                model_type = getattr(config, "model_type", None)
                if model_type != "gpt_neox":
                    raise ConversionError(
                        f"{self._model_name_or_path} is not a GPT-NeoX checkpoint: found model_type "
                        f"{model_type!r} ({type(config).__name__}, architectures "
                        f"{getattr(config, 'architectures', None)}); jachat serves GPT-NeoX (model_type "
                        "'gpt_neox') models such as rinna/japanese-gpt-neox-3.6b-instruction-ppo"
                    )
                self.config = config
                spiece = Path(self.get_model_file(TOKENIZER_FILE))
                vocabulary = SentencePieceVocabulary(spiece)
                kwargs: dict[str, Any] = {
                    "config": config,
                    "dtype": getattr(config, "dtype", None) or getattr(config, "torch_dtype", None),
                    "low_cpu_mem_usage": True,
                }
                if self._revision:
                    kwargs["revision"] = self._revision
                if self._trust_remote_code:
                    kwargs["trust_remote_code"] = True
                if _has_safetensors(self._model_name_or_path, self._revision):
                    kwargs["use_safetensors"] = True
                else:
                    log.warning("no safetensors weights in %s: loading PyTorch pickles", self._model_name_or_path)
                model = transformers.GPTNeoXForCausalLM.from_pretrained(self._model_name_or_path, **kwargs)
                spec = _spec_loader()(model, vocabulary)
                spec.register_file(str(spiece))
                del model
                return spec

        def get_model_file(self, filename: str) -> str:
            if os.path.isdir(self._model_name_or_path):
                path = Path(self._model_name_or_path) / filename
                if not path.is_file():
                    raise ConversionError(f"{filename} not found in {self._model_name_or_path}")
                return str(path)
            import huggingface_hub

            source, revision = self._model_name_or_path, self._revision
            return str(_from_hub(source, lambda: huggingface_hub.hf_hub_download(source, filename, revision=revision)))

    return GPTNeoXConverter


OFFLINE_HINT = (
    "Without internet, serve the offline demo model instead: `JACHAT_DEMO=1 scripts/serve`, or build one with "
    "`jachat-convert --demo DIR` and convert DIR."
)


def _from_hub(source: str, call: Callable[[], T]) -> T:
    """Run a hub request; failures become one plain ConversionError (offline: it names the demo command)."""
    try:
        return call()
    except Exception as exc:
        name = type(exc).__name__
        if name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            raise ConversionError(f"{source}: not found on the Hugging Face hub or not accessible ({name})") from exc
        if isinstance(exc, OSError) or "Connect" in name or "Timeout" in name:
            raise ConversionError(
                f"cannot reach the Hugging Face hub to download {source} ({name}). {OFFLINE_HINT}"
            ) from exc
        raise


def _has_safetensors(source: str, revision: str | None) -> bool:
    if os.path.isdir(source):
        return any(Path(source).glob("*.safetensors"))
    import huggingface_hub

    files = _from_hub(source, lambda: huggingface_hub.list_repo_files(source, revision=revision))
    return any(name.endswith(".safetensors") for name in files)


def _resolve_revision(source: str, revision: str | None) -> str | None:
    """The exact commit of a hub checkpoint (None for a local folder)."""
    if os.path.isdir(source):
        return revision
    import huggingface_hub

    sha: str | None = _from_hub(source, lambda: huggingface_hub.model_info(source, revision=revision).sha)
    return sha


def _tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("jachat", "ctranslate2", "transformers", "torch", "sentencepiece", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def convert(options: ConvertOptions) -> Path:
    """Convert options.source into options.output; returns the output folder."""
    output = Path(options.output)
    if output.exists() and not options.force:
        raise ConversionError(f"output folder {output} already exists (use --force to replace it)")
    if not os.path.isdir(options.source) and (Path(options.source).exists() or options.source.startswith(".")):
        raise ConversionError(f"source {options.source} is neither a local folder nor a hub model id")
    started = time.monotonic()
    revision = _resolve_revision(options.source, options.revision)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        converter = _converter_class()(options)
        converter.convert(str(staging), quantization=options.quantization, force=True)
        config = converter.config
        manifest = Manifest(
            source=options.source,
            revision=revision,
            quantization=options.quantization,
            shape=ModelShape(
                architecture="GPTNeoXForCausalLM",
                num_layers=config.num_hidden_layers,
                hidden_size=config.hidden_size,
                num_heads=config.num_attention_heads,
                vocab_size=config.vocab_size,
                context_length=config.max_position_embeddings,
            ),
            tools=_tool_versions(),
            files=checksum_folder(staging),
        )
        write_manifest(staging, manifest)
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "converted %s to %s (%s) in %.1f s",
        options.source,
        output,
        options.quantization,
        time.monotonic() - started,
    )
    return output
