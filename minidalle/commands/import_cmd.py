"""``minidalle import FORMAT CKPT --out RUN_DIR`` and ``minidalle export dalle-pytorch RUN_DIR
--out dalle.pt``: checkpoints of DALLE-pytorch and Graphcore's mini DALL-E (see
:mod:`minidalle.interop`)."""
from __future__ import annotations

import sys

FORMATS = ("dalle-pytorch", "graphcore")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "import", help="turn a DALLE-pytorch or Graphcore mini DALL-E checkpoint into a run dir",
        description="Read a DALLE-pytorch dalle.pt or a Graphcore mini DALL-E dalle_<epoch>.pt "
                    "(torch.load with weights_only=True: no code in the file runs), map its hparams "
                    "onto [model], its weights onto minidalle's modules (the same function) and its "
                    "Adam state onto minidalle's optimizer, and write an ordinary run directory: "
                    "checkpoints/step-00000000/ and config.toml. `generate --checkpoint RUN_DIR`, "
                    "`evaluate RUN_DIR`, `plan RUN_DIR/config.toml` and `run RUN_DIR/config.toml "
                    "--resume` then work on it. A feature minidalle's model lacks is refused, "
                    "naming the hparams key.")
    p.add_argument("format", choices=FORMATS, help="whose checkpoint it is")
    p.add_argument("checkpoint", metavar="CKPT", help="the .pt file")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run directory to write (new)")
    p.add_argument("--tokenizer", metavar="NAME",
                   help="the [tokenizer] the checkpoint was trained with (e.g. yttm with "
                        "--set tokenizer.path=bpe.model, or clip); needed by generate and run")
    p.add_argument("--codec", metavar="NAME",
                   help="the [codec] (default: vqgan when the checkpoint names a taming VQGAN; "
                        "give its file with --set codec.path=last.ckpt)")
    p.add_argument("--backend", metavar="NAME",
                   help="the [backend] (default: cpu; for Graphcore, ipu with the checkpoint's "
                        "layers_per_ipu placement)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="set a value of the written config, e.g. --set codec.path=vqgan.ckpt, "
                        "--set dataset.name=folder (repeatable)")
    p.set_defaults(func=run_import)

    e = sub.add_parser(
        "export", help="write a run's checkpoint as a DALLE-pytorch dalle.pt",
        description="Write the newest checkpoint of RUN_DIR in DALLE-pytorch 1.6.6's train_dalle.py "
                    "format (hparams, vae_params, weights, opt_state), for a model DALLE-pytorch can "
                    "build (attention full, axial_row, axial_col, conv_like with the corner anchor).")
    e.add_argument("format", choices=("dalle-pytorch",), help="the format to write")
    e.add_argument("run_dir", metavar="RUN_DIR", help="a run, checkpoints or step directory")
    e.add_argument("--out", required=True, metavar="FILE", help="the .pt file to write")
    e.set_defaults(func=run_export)


def _warn(message: str) -> None:
    print(f"minidalle: warning: {message}", file=sys.stderr)


def run_import(args) -> int:
    if args.format == "dalle-pytorch":
        from minidalle.interop.dalle_pytorch import import_checkpoint
    else:
        from minidalle.interop.graphcore import import_checkpoint
    out = import_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer, codec=args.codec,
                            backend=args.backend, overrides=args.overrides, warn=_warn)
    print(f"imported {args.checkpoint} into {out}")
    import tomli

    table = tomli.loads((out / "config.toml").read_text(encoding="utf-8"))
    if "tokenizer" not in table:
        _warn("no [tokenizer]: generate and run need the one the checkpoint was trained with; "
              "import again with --tokenizer NAME (resume checks it against the checkpoint's)")
    print(f"  generate:  minidalle generate --checkpoint {out} --text \"...\"")
    on_ipu = table.get("backend", {}).get("name") == "ipu"
    print(f"  fine-tune: minidalle run {out / 'config.toml'} --resume --set dataset.name=..."
          + ("  (add --backend cpu without IPUs)" if on_ipu else ""))
    if on_ipu:
        print(f"  IPU plan:  minidalle plan {out / 'config.toml'}")
    return 0


def run_export(args) -> int:
    from minidalle.interop.dalle_pytorch import export_run

    path = export_run(args.run_dir, args.out, warn=_warn)
    print(f"wrote {path}")
    return 0
