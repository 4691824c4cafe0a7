"""`python -m raddino_jax.convert {from-torch,to-hf,to-dinov2}`: weight import and export.

  from-torch --input PATH [--heads PATH] --out DIR
  to-hf      --checkpoint PATH --out DIR [--which teacher|student] [--verify]
  to-dinov2  --checkpoint PATH --out FILE [--heads FILE] [--which teacher|student] [--verify]

Every conversion is strict (all tensors consumed, all parameters filled, all shapes checked);
on any mismatch it prints the offending names and writes nothing.
"""

from __future__ import annotations

import argparse
import sys

from etils import epath

from raddino_jax import checkpoint
from raddino_jax.convert import declared, from_torch, names, to_torch


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m raddino_jax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    imp = sub.add_parser("from-torch", help="PyTorch DINOv2 / RAD-DINO weights -> Orbax params")
    imp.add_argument("--input", required=True, help="transformers folder, .safetensors or .pth")
    imp.add_argument("--heads", help="DINO head file (e.g. RAD-DINO dino_head.safetensors)")
    imp.add_argument("--out", required=True, help="output directory (local or gs://)")
    imp.add_argument("--which", default="teacher", choices=["teacher", "student"],
                     help="which model of a dinov2 training checkpoint to import")
    imp.add_argument("--num-heads", type=int, help="attention heads (default: config.json or D/64)")
    imp.add_argument("--patch-size", type=int, help="expected patch size (checked against weights)")
    imp.add_argument("--interpolate-mode", choices=["offset", "size", "size_antialias"],
                     help="positional-embedding resampling (default: what the source used)")
    imp.add_argument("--mean", type=float, default=checkpoint.Preprocessing.mean)
    imp.add_argument("--std", type=float, default=checkpoint.Preprocessing.std)

    for name, help_text in (
        ("to-hf", "-> transformers Dinov2Model folder"),
        ("to-dinov2", "-> original dinov2 hub layout file"),
    ):
        exp = sub.add_parser(name, help=help_text)
        exp.add_argument("--checkpoint", required=True,
                         help="a from-torch output or a training run directory")
        exp.add_argument("--out", required=True)
        exp.add_argument("--which", default="teacher", choices=["teacher", "student"],
                         help="model of a training run to export (default: teacher)")
        exp.add_argument("--verify", action="store_true",
                         help="reload with torch/transformers and compare outputs")
        if name == "to-dinov2":
            exp.add_argument("--heads", help="also write the DINO head (RAD-DINO dino_head layout)")
    return parser


def cmd_from_torch(args: argparse.Namespace) -> None:
    out = epath.Path(args.out)
    if (out / checkpoint.PARAMS_ITEM).exists():
        raise FileExistsError(f"{out} already holds a checkpoint; choose another --out")
    spec, params = from_torch.read_torch_weights(
        args.input, args.heads, which=args.which, num_heads=args.num_heads,
        interpolate_mode=args.interpolate_mode, patch_size=args.patch_size,
    )
    pre = checkpoint.Preprocessing(image_size=spec.backbone.img_size, mean=args.mean, std=args.std)
    checkpoint.save_params(out, spec, params, pre)
    n = sum(len(names.flatten(v)) for v in params.values())
    print(f"imported {n} tensors ({', '.join(params)}) from {args.input} -> {out}")


def cmd_to_hf(args: argparse.Namespace) -> None:
    spec, params = checkpoint.load_any_params(args.checkpoint, which=args.which)
    out = to_torch.write_hf(args.out, spec, params, checkpoint.load_preprocessing(args.checkpoint))
    print(f"wrote transformers {to_torch.hf_config(spec)['architectures'][0]} folder {out}")
    if args.verify:
        from raddino_jax.convert import verify

        diff = verify.verify_hf_folder(out, spec, params)
        print(f"verified: AutoModel loads {out} strictly; max |torch - jax| = {diff:.3g}")


def cmd_to_dinov2(args: argparse.Namespace) -> None:
    spec, params = checkpoint.load_any_params(args.checkpoint, which=args.which)
    if args.heads and "dino_head" not in params:
        raise ValueError(f"{args.checkpoint} has no dino_head to write to {args.heads}")
    path = to_torch.write_state_dict(args.out, to_torch.backbone_to_dinov2(params))
    print(f"wrote dinov2 hub-layout backbone {path}")
    if args.heads:
        head = to_torch.head_to_dinov2(params["dino_head"])
        head_path = to_torch.write_state_dict(args.heads, head, declared.head_metadata(head))
        print(f"wrote DINO head {head_path}")
    if args.verify:
        from raddino_jax.convert import verify

        diff = verify.verify_dinov2_file(path, spec, params)
        print(f"verified: {path} round-trips bit for bit; max |torch - jax| = {diff:.3g}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"from-torch": cmd_from_torch, "to-hf": cmd_to_hf, "to-dinov2": cmd_to_dinov2}
    try:
        commands[args.command](args)
    except (names.ConversionError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
