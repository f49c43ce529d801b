"""jachat-convert: convert a checkpoint, or build the offline demo checkpoint."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from jachat.converter.convert import DEFAULT_SOURCE, QUANTIZATIONS, ConversionError, ConvertOptions, convert
from jachat.converter.demo import NORMALIZATIONS, DemoShape, build_demo_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jachat-convert",
        description="Convert a Hugging Face GPT-NeoX checkpoint (hub id or local folder) into a CTranslate2 "
        "model folder with spiece.model and a manifest, or build a random-weight demo checkpoint (--demo).",
    )
    parser.add_argument("source", nargs="?", help=f"hub model id or local folder (e.g. {DEFAULT_SOURCE})")
    parser.add_argument("--output", "-o", type=Path, help="output folder for the converted model")
    parser.add_argument(
        "--quantization",
        "-q",
        default="int8",
        choices=QUANTIZATIONS,
        help="weight type of the converted model (default: int8)",
    )
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) to convert")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the checkpoint's own Python code to run (off by default)",
    )
    demo = parser.add_argument_group("offline demo checkpoint")
    demo.add_argument(
        "--demo",
        type=Path,
        metavar="DIR",
        help="build a random-weight rinna-shaped Hugging Face checkpoint in DIR and exit",
    )
    demo.add_argument("--demo-hidden-size", type=int, default=DemoShape.hidden_size)
    demo.add_argument("--demo-layers", type=int, default=DemoShape.num_layers)
    demo.add_argument("--demo-heads", type=int, default=DemoShape.num_heads)
    demo.add_argument("--demo-vocab-size", type=int, default=DemoShape.vocab_size)
    demo.add_argument("--demo-dtype", choices=("float32", "float16"), default=DemoShape.dtype)
    demo.add_argument("--demo-seed", type=int, default=DemoShape.seed)
    demo.add_argument(
        "--demo-normalization",
        choices=NORMALIZATIONS,
        default=DemoShape.normalization,
        help="spiece.model's normalization rule (rinna's own applies NFKC; custom: a strict look-alike table)",
    )
    demo.add_argument(
        "--demo-no-newline-piece",
        action="store_true",
        help="leave <NL> out of the vocabulary (it is then spelled with several pieces)",
    )
    demo.add_argument(
        "--demo-full-size",
        action="store_true",
        help="rinna's own shape: 36 layers, hidden 2816, 22 heads, float16 (7.2 GB)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.demo is not None:
            shape = (
                DemoShape.full_size()
                if args.demo_full_size
                else DemoShape(
                    hidden_size=args.demo_hidden_size,
                    num_layers=args.demo_layers,
                    num_heads=args.demo_heads,
                    vocab_size=args.demo_vocab_size,
                    dtype=args.demo_dtype,
                    newline_piece=not args.demo_no_newline_piece,
                    normalization=args.demo_normalization,
                    seed=args.demo_seed,
                )
            )
            path = build_demo_checkpoint(args.demo, shape, force=args.force)
            print(f"demo checkpoint written to {path}; convert it with: jachat-convert {path} --output DIR")
            return 0
        if not args.source or args.output is None:
            parser.error("SOURCE and --output are required (or use --demo DIR)")
        options = ConvertOptions(
            source=args.source,
            output=args.output,
            quantization=args.quantization,
            revision=args.revision,
            force=args.force,
            trust_remote_code=args.trust_remote_code,
        )
        print(f"converted model written to {convert(options)}")
        return 0
    except (ConversionError, FileExistsError, ValueError) as exc:
        print(f"jachat-convert: error: {exc}", file=sys.stderr)
        return 1
    except ImportError as exc:
        print(
            f"jachat-convert: error: {exc.name or exc} is missing; install the converter's extra: "
            "pip install 'jachat[convert]'",
            file=sys.stderr,
        )
        return 1
    except OSError as exc:
        print(f"jachat-convert: error: {exc}", file=sys.stderr)
        return 1
