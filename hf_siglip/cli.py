"""The `hf-siglip` command (also `python -m hf_siglip`)."""

import argparse
import sys


def _convert(args: argparse.Namespace) -> int:
    from .convert import convert_to_bottleneck

    _, result = convert_to_bottleneck(args.src, args.dst, args.bottleneck_dim)
    saved = result.parameters_before - result.parameters_after
    print(
        f"Converted {args.src} -> {args.dst}: token table {result.vocab_size} x {result.hidden_size} -> "
        f"{result.vocab_size} x {result.bottleneck_dim} + {result.bottleneck_dim} x {result.hidden_size}\n"
        f"relative reconstruction error ||E - E_K||_F / ||E||_F = {result.relative_error:.6f}\n"
        f"parameters: {result.parameters_before:,} -> {result.parameters_after:,} ({saved:,} fewer)"
    )
    return 0


def _push(args: argparse.Namespace) -> int:
    from transformers import AutoModel, AutoProcessor

    from .hub import push_to_hub

    model = AutoModel.from_pretrained(args.checkpoint)
    try:
        processor = AutoProcessor.from_pretrained(args.checkpoint)
    except (OSError, ValueError, TypeError):
        processor = None
    commit = push_to_hub(
        model,
        args.repo_id,
        processor,
        private=args.private,
        base_model=args.base_model,
        datasets=args.dataset,
        license=args.license,
    )
    print(f"Pushed {args.checkpoint} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-siglip", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert", help="Turn a native SigLIP checkpoint into one with bottleneck token embeddings (truncated SVD)."
    )
    convert.add_argument("src", help="native SigLIP checkpoint folder (or Hub id)")
    convert.add_argument("dst", help="output folder")
    convert.add_argument("--bottleneck-dim", type=int, required=True, help="K, the bottleneck width (paper: 96)")
    convert.set_defaults(func=_convert)

    push = commands.add_parser("push", help="Upload a checkpoint folder with its processor and a model card.")
    push.add_argument("checkpoint", help="folder written by save_pretrained / hf-siglip train")
    push.add_argument("repo_id", help="Hub repository, e.g. you/siglip-demo")
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--base-model", default=None, help="model card metadata: the checkpoint fine-tuned from")
    push.add_argument("--dataset", action="append", default=None, help="model card metadata (repeatable)")
    push.add_argument("--license", default="apache-2.0", help="model card license (default apache-2.0)")
    push.set_defaults(func=_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
