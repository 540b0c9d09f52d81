"""Export an fd-ref model to a timm / Hugging Face folder that plain timm loads (no fd-ref needed).

    python export.py out/quickstart/student.pt out/quickstart_export
    python export.py out/ft/best.pt out/ft_export --push-to-hub USER/fd-vit-base

    import timm
    model = timm.create_model("local-dir:out/quickstart_export", pretrained=True)

Takes student.pt (train.py), best.pt or checkpoint.pt (train.py / finetune.py). Writes config.json,
model.safetensors and README.md (a model card); the model becomes timm's Beit, checked on a random input to
give fd-ref's outputs before anything is written. See fd_ref/timm_export.py.
"""
from __future__ import annotations

import argparse

from fd_ref.cli import run_main
from fd_ref.errors import UserError
from fd_ref.timm_export import export_model, push_to_hub


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise UserError(f"export.py: {message} (see --help)")


def main(argv=None) -> dict:
    parser = _Parser(prog="export.py", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="student.pt, best.pt or checkpoint.pt written by train.py / finetune.py")
    parser.add_argument("folder", help="the folder to write (config.json, model.safetensors, README.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty folder")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                        help="also upload the folder to the Hugging Face hub as this model repository")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    args = parser.parse_args(argv)
    summary = export_model(args.checkpoint, args.folder, overwrite=args.overwrite, repo_id=args.push_to_hub)
    m = summary["model_args"]
    if "use_shared_rel_pos_bias" in m:  # fd-ref's ViT as timm's Beit
        pos = "shared" if m["use_shared_rel_pos_bias"] else "per-block" if m["use_rel_pos_bias"] else "absolute"
        shape = (f"{m['depth']} blocks, width {m['embed_dim']}, {pos} position, {m['num_classes'] or 'no'} "
                 f"classes, {m['img_size']} px")
    else:  # a timm student as itself
        shape = f"arguments {m}, {summary['num_classes'] or 'no'} classes"
    print(f"wrote {args.folder}: timm {summary['architecture']} ({shape}); outputs equal fd-ref's "
          f"(max difference {summary['max_difference']:.1e})", flush=True)
    print(f'load it: timm.create_model("local-dir:{args.folder}", pretrained=True)', flush=True)
    if args.push_to_hub:
        url = push_to_hub(args.folder, args.push_to_hub, private=args.private)
        summary["url"] = url
        print(f"pushed to {url}", flush=True)
    return summary


if __name__ == "__main__":
    run_main(main)
