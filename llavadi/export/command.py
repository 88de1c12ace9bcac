"""The `llavadi export` subcommand: a saved model to an on-device runtime's files."""

from __future__ import annotations

import argparse
import json
import sys

from llavadi.export import TARGETS


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` subcommand to the CLI's subparsers."""
    from llavadi.export.gguf_files import QUANT_FTYPES
    from llavadi.export.gguf_target import DEFAULT_QUANTS, POSITION_CHOICES

    e = subparsers.add_parser(
        "export", help="write a saved LLaVA model for an on-device runtime (llama.cpp GGUF), quantized")
    e.add_argument("model", help="saved model folder (a trained student's final/ folder)")
    e.add_argument("--to", required=True, choices=TARGETS, help="runtime whose files to write")
    e.add_argument("--out", required=True, help="output folder (built beside it, then renamed into place)")
    e.add_argument("--quant", default=",".join(DEFAULT_QUANTS),
                   help=f"comma-separated quantizations of the language model, from {', '.join(QUANT_FTYPES)}; "
                        f"f32/f16 need the gguf package, the others llama-cpp-python (default: "
                        f"{','.join(DEFAULT_QUANTS)})")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    e.add_argument("--threads", type=int, default=0, help="quantizer threads (0: llama.cpp's choice)")
    e.add_argument("--position-table", default="auto", choices=POSITION_CHOICES,
                   help="the mmproj's position embeddings: rotated for llama.cpp's LLaVA graph that reads the class "
                        "token after the patches, hf as CLIP lays them out, auto: probe the installed llama.cpp "
                        "(hf when llama-cpp-python is absent) (default: auto)")
    e.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Export; print the manifest's variants (file, size, tensor types); errors name what is refused."""
    from llavadi.export.gguf_probe import ProbeInconclusive
    from llavadi.export.gguf_target import export_gguf, parse_quants
    from llavadi.export.support import ExportRefused

    try:
        quants = parse_quants(args.quant)
        manifest = export_gguf(args.model, args.out, quants, force=args.force, threads=args.threads,
                               position_table=args.position_table)
    except (ExportRefused, FileExistsError, ImportError, ValueError, ProbeInconclusive) as err:
        print(f"llavadi export: error: {err}", file=sys.stderr)
        return 2
    summary = {name: {"file": v["model"], "bytes": v["model_bytes"], "tensor_types": v["tensor_types"]}
               for name, v in manifest["variants"].items()}
    print(json.dumps({"out": args.out, "mmproj_bytes": manifest["mmproj_bytes"],
                      "position_table": manifest["position_table"], "variants": summary}, indent=2))
    return 0
