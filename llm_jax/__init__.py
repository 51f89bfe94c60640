"""llm_jax: decoder-only Transformer language models in JAX/Flax, from raw text to generated text.

The package is built in layers, lowest first. A module imports only modules of its own layer or a lower one, lazy
imports included; tests/test_imports.py reads LAYERS and enforces it, and a new module must be placed here.

  base   the user-error family, paths, run errors and signals, chat templates, the profiler switch
  core   the compile target and TPU chips, the model and its record, its attention and adapters, mesh rules, batch
         schema, optimizers, metrics, the train/eval steps, sampling, the compile-only report and its roofline estimate:
         frozen configs in, pure functions out, no run files
  data   text to tokens: corpora, cleaning, splits, the token store, packing, the input pipeline, tokenizers
  io     one run's files: the workdir's records, checkpoints, metric writers
  run    what one run or study does: config resolution and the run record, resume checks, the loop and trainer,
         evaluations, sweeps, Hugging Face directories in and out of workdirs, the benchmark shapes, looking inside
         a model (interp), the TPU planner
  entry  the command-line programs (`python -m llm_jax.<name>`) and what they share (launch)
"""

__version__ = "0.1.0"

# Layer name -> module names relative to `llm_jax`; "pkg.*" stands for a sub-package and all its modules.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("errors", "paths", "faults", "chat", "profiler")),
    ("core", ("target", "tpu", "roofline", "model_config", "model", "attention", "attention_kernels", "lora",
              "sharding", "batch", "optim", "metrics", "steps", "sampling", "dryrun", "hf.weights")),
    ("data", ("data.*", "tokenizer", "hf.tokenizer")),
    ("io", ("workdir", "checkpoint", "writers")),
    ("run", ("config", "run_config", "resume", "loop", "trainer", "evals.*", "sweeps.*", "hf", "hf.files",
             "bench_shapes", "interp.*", "planner")),
    ("entry", ("launch", "train", "generate", "evaluate", "convert", "prepare", "sweep", "bench", "harness",
               "inspect", "plan")),
)
