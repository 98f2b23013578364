"""Built-in components, stages and commands, registered through the same hooks as any
third-party plugin.

Factories, stage functions, commands and config classes are lazy ``"module:attr"`` strings
so that listing components imports nothing heavy.
"""
from minidalle import hookimpl

C = "minidalle.components"


@hookimpl
def minidalle_tokenizers(register):
    register("yttm", f"{C}.tokenizers.yttm:build", config=f"{C}.tokenizers.yttm:YttmConfig",
             summary="youtokentome BPE: load a model file or train one from captions",
             requires=("youtokentome",))
    register("clip", f"{C}.tokenizers.clip:build", config=f"{C}.tokenizers.clip:ClipConfig",
             summary="CLIP simple byte-level BPE (bpe_simple_vocab_16e6.txt.gz)",
             requires=("ftfy", "regex"))


@hookimpl
def minidalle_codecs(register):
    register("vqgan", f"{C}.codecs.vqgan:build", config=f"{C}.codecs.vqgan:VqganConfig",
             summary="taming-transformers VQGAN checkpoint (.ckpt + .yaml), frozen",
             requires=("taming", "yaml"))


@hookimpl
def minidalle_attention(register):
    for name, summary in (
        ("full", "causal attention over all earlier positions"),
        ("axial_row", "image tokens see all text and earlier tokens of their image row"),
        ("axial_col", "image tokens see all text and earlier tokens of their image column"),
        ("conv_like", "image tokens see all text and earlier tokens in a k x k window"),
    ):
        register(name, f"{C}.attention:{name}", config=f"{C}.attention:config_for_{name}",
                 summary=summary)


@hookimpl
def minidalle_datasets(register):
    register("coco", f"{C}.datasets.coco:build", config=f"{C}.datasets.coco:CocoConfig",
             summary="MS COCO 2017 captions (annotations JSON + image folder)")
    register("folder", f"{C}.datasets.folder:build", config=f"{C}.datasets.folder:FolderConfig",
             summary="a folder of images, each with a .txt caption file beside it")
    register("shapes", f"{C}.datasets.shapes:build", config=f"{C}.datasets.shapes:ShapesConfig",
             summary="procedural coloured shapes with captions (offline, any size)",
             evaluate="minidalle.recipes.quickstart.evaluation:shapes_fidelity")
    register("codes", f"{C}.datasets.codes:build", config=f"{C}.datasets.codes:CodesConfig",
             summary="a cache of (caption, image codes) written by `minidalle prepare codes`")


@hookimpl
def minidalle_backends(register):
    register("cpu", f"{C}.backends.cpu:build", config=f"{C}.backends.cpu:CpuConfig",
             summary="the reference: fp32 deterministic; precision auto picks bf16 only where the CPU has fast native bf16")
    register("cuda", f"{C}.backends.cuda:build", config=f"{C}.backends.cuda:CudaConfig",
             summary="NVIDIA GPU: fp32, bf16 autocast, fp16 with dynamic loss scaling",
             check=f"{C}.backends.cuda_probe:unavailable_reason")
    register("ipu", f"{C}.backends.ipu.backend:build", config="minidalle.components.backends.ipu.plan:IpuConfig",
             summary="Graphcore IPU through PopTorch (pipelined, replicated)",
             # not `requires`: the check's reason names the Poplar SDK and --backend cpu
             check="minidalle.components.backends.ipu:unavailable_reason")


@hookimpl
def minidalle_rerankers(register):
    register("likelihood", f"{C}.rerankers.likelihood:build",
             config=f"{C}.rerankers.likelihood:LikelihoodConfig",
             summary="the model's own log p(image | caption), optionally minus p(image | null caption)")
    register("clip", f"{C}.rerankers.clip:build", config=f"{C}.rerankers.clip:ClipRerankerConfig",
             summary="open_clip image-text similarity, from a local weights file only",
             requires=("open_clip",))


Q = "minidalle.recipes.quickstart.stages"


@hookimpl
def minidalle_stages(register):
    register("transformer", "minidalle.recipes.stages:run_transformer",
             is_complete="minidalle.recipes.stages:transformer_complete",
             clean="minidalle.recipes.stages:clean_transformer", parallel=True,
             summary="train the DALL-E transformer (checkpoints, metrics.jsonl)")
    # The quickstart recipe's stages.
    register("codec", f"{Q}:run_codec", is_complete=f"{Q}:codec_complete", clean=f"{Q}:clean_codec",
             summary="train a VQ image codec ([codec_training]) into [codec] path",
             sections={"codec_training": f"{C}.codecs.vqgan_training:CodecTrainingConfig"})
    register("tokenizer", f"{Q}:run_tokenizer", is_complete=f"{Q}:tokenizer_complete",
             clean=f"{Q}:clean_tokenizer", requires=("youtokentome",),
             summary="train a youtokentome BPE model on the captions into [tokenizer] path",
             sections={"tokenizer_training": f"{C}.tokenizers.training:TokenizerTrainingConfig"})
    register("samples", f"{Q}:run_samples", outputs=f"{Q}:samples_files",
             summary="samples.png (held-out prompts) and reconstructions.png")
    register("evaluate", f"{Q}:run_evaluate", outputs=f"{Q}:evaluate_files",
             summary="metrics.json (prompt fidelity, codec PSNR, losses) and loss.png",
             sections={"evaluate": "minidalle.recipes.quickstart.evaluation:EvaluateConfig"})


@hookimpl
def minidalle_commands(register):
    # in the order `minidalle --help` lists them
    M = "minidalle.commands"
    for name, module in (("list", "list_cmd"), ("config", "config_cmd"), ("run", "run"),
                         ("plan", "plan"), ("generate", "generate"), ("evaluate", "evaluate")):
        register(name, f"{M}.{module}")
    register("bench", f"{M}.bench", sections={"bench": "minidalle.bench.settings:BenchConfig"})
    for name, module in (("prepare", "prepare"), ("tokenizer", "tokenizer_cmd"),
                         ("train-codec", "train_codec"), ("new-plugin", "new_plugin"),
                         ("import", "import_cmd"),  # also adds `export`
                         ("env", "env_cmd")):
        register(name, f"{M}.{module}")
