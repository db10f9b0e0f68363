"""The `cops-hf` command line: one subcommand per task; each parses its arguments and calls the library.

Each subcommand has an `add_<name>_parser(subparsers)` function that declares its arguments and a
`<name>_command(args)` function that runs it; `build_parser` lists them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def add_export_parser(subparsers: argparse._SubParsersAction) -> None:
    """Declare `cops-hf export`."""
    parser = subparsers.add_parser(
        "export",
        help="export a saved model's whole inference to ONNX",
        description="Export the whole CoPS inference (fixed VAE noise, dynamic batch) as one ONNX graph.",
    )
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    parser.add_argument("--model", required=True, help="directory (or hub id) of a saved CoPS model")
    parser.add_argument("--output", required=True, help="path of the .onnx file to write")
    parser.add_argument("--vae-samples", type=int, default=None, help="VAE samples in the graph (default: config)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed VAE noise (default: 0)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset version (default: 17)")
    parser.add_argument(
        "--int8", action="store_true", help="also write <output>.int8.onnx with int8 dynamically quantized weights"
    )
    parser.set_defaults(handler=export_command)


def export_command(args: argparse.Namespace) -> int:
    """Run `cops-hf export`."""
    from .export import export_onnx, quantize_onnx_int8
    from .modeling_cops import CoPSForAnomalyDetection

    model = CoPSForAnomalyDetection.from_pretrained(args.model)
    path = export_onnx(model, args.output, vae_samples=args.vae_samples, seed=args.seed, opset=args.opset)
    print(f"Wrote {path}")
    if args.int8:
        quantized = quantize_onnx_int8(path, path.with_suffix(".int8.onnx"))
        print(f"Wrote {quantized}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `cops-hf` parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="cops-hf", description="CoPS zero-shot anomaly detection.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_export_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cops-hf` script."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
