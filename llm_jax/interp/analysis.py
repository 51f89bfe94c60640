"""What a model computes on one text, window by window: per-token losses and top predictions, its attention
probabilities and per-head statistics, and the logit lens (each layer's residual stream read through the final
norm and the output head).

The text is scored exactly as `llm_jax.evals.documents` scores a document ([conditioning token] + ids, windows of
`seq_len` tokens advancing by `stride`, each target scored once), so the per-token losses sum to the NLL that
`llm_jax.evaluate` reports. The attention probabilities are the ones the model's own attention computes its output
from: the model sows them when 'intermediates' is mutable, which also makes it take the reference einsum path in one
query block (fused kernels keep no probabilities). Windows are read one at a time; only the first window's full
attention maps are kept, so memory is bounded by one window whatever the text's length.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any
from typing import NamedTuple
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import errors
from llm_jax.evals import documents as doc_eval
from llm_jax.evals import scoring
from llm_jax.model import Norm
from llm_jax.model import Transformer
from llm_jax.model import output_logits
from llm_jax.model_config import ModelConfig

Array = jax.Array
TOP_K = 5
# Per-head statistics over the scored queries (slot >= 1): each is a mean over queries.
HEAD_STATS = ("entropy", "uniform_entropy", "first", "previous", "self", "local", "distance")
LOCAL_KEYS = 8  # 'local': weight on the query itself and the LOCAL_KEYS - 1 tokens before it
# Tokens of context a piece is decoded with, so that leading spaces and multi-byte characters come out right.
PIECE_CONTEXT = 16


class Captured(NamedTuple):
  """One forward pass: logits, every layer's attention probabilities and the residual stream (M = N + 1: the
  embedding output, then each block's output)."""

  logits_BxLxV: Array
  probs_NxBxHxLxS: Array
  residual_MxBxLxD: Array


def reference_config(cfg: ModelConfig) -> ModelConfig:
  """The model as inspection runs it: reference einsum attention, no remat (runtime fields: same parameters)."""
  return dataclasses.replace(cfg, attention_impl="einsum", remat_policy="none")


def capture(params: Any, cfg: ModelConfig, tokens_BxL: Array, positions_BxL: Array | None = None,
            segment_ids_BxL: Array | None = None) -> Captured:
  """Applies the model with its intermediates kept (scanned or unrolled layers alike)."""
  (logits_BxLxV, _), state = Transformer(cfg).apply({"params": params}, tokens_BxL, positions_BxL, segment_ids_BxL,
                                                    mutable=["intermediates"])
  sown = state["intermediates"]
  if cfg.scan_layers:
    probs, residual = sown["layers"]["attn"]["probs"][0], sown["layers"]["residual"][0]
  else:
    layers = [sown[f"layers_{i}"] for i in range(cfg.num_layers)]
    probs = jnp.stack([layer["attn"]["probs"][0] for layer in layers])
    residual = jnp.stack([layer["residual"][0] for layer in layers])
  residual = jnp.concatenate([sown["embedded"][0][None].astype(residual.dtype), residual])
  return Captured(logits_BxLxV, probs, residual)


def lens(params: Any, cfg: ModelConfig, residual_MxBxLxD: Array) -> tuple[Array, Array]:
  """(top token, its probability) of each layer's residual stream read through the final norm and the output
  head, one layer at a time (memory: one layer's logits)."""
  norm = Norm(cfg.is_llama, cfg.norm_eps)

  def read(x_BxLxD: Array) -> tuple[Array, Array]:
    h_BxLxD = norm.apply({"params": params["final_norm"]}, x_BxLxD)
    logits_BxLxV = output_logits(cfg, h_BxLxD, params["embed"], params.get("lm_head"))
    return jnp.argmax(logits_BxLxV, axis=-1), jnp.max(jax.nn.softmax(logits_BxLxV, axis=-1), axis=-1)

  return jax.lax.map(read, residual_MxBxLxD)


def head_sums(probs_NxBxHxLxS: Array, query_BxL: Array) -> dict[str, Array]:
  """Sums over the queries in `query_BxL` (float mask) of each HEAD_STATS, N x H, and the query count."""
  l, s = probs_NxBxHxLxS.shape[-2:]
  q_L, k_S = jnp.arange(l), jnp.arange(s)
  w = query_BxL[None, :, None, :]  # 1 x B x 1 x L
  per_query = {
      "entropy": jnp.sum(jax.scipy.special.entr(probs_NxBxHxLxS), axis=-1),
      "uniform_entropy": jnp.broadcast_to(jnp.log(q_L + 1.0), probs_NxBxHxLxS.shape[:-1]),
      "first": probs_NxBxHxLxS[..., 0],
      "previous": jnp.sum(jnp.where(k_S == q_L[:, None] - 1, probs_NxBxHxLxS, 0.0), axis=-1),
      "self": jnp.sum(jnp.where(k_S == q_L[:, None], probs_NxBxHxLxS, 0.0), axis=-1),
      "local": jnp.sum(jnp.where(k_S > q_L[:, None] - LOCAL_KEYS, probs_NxBxHxLxS, 0.0), axis=-1),
      "distance": jnp.sum(probs_NxBxHxLxS * (q_L[:, None] - k_S).astype(jnp.float32), axis=-1),
  }
  sums = {name: jnp.sum(v * w, axis=(1, 3)) for name, v in per_query.items()}
  sums["count"] = jnp.sum(query_BxL)
  return sums


@functools.partial(jax.jit, static_argnames=("cfg", "keep_maps"))
def analyse_rows(params: Any, rows: dict[str, Array], *, cfg: ModelConfig, keep_maps: bool) -> dict[str, Array]:
  """Per position: NLL of the target, top-k predictions, lens; per head: statistics over the scored queries; and,
  with `keep_maps`, the attention probabilities themselves."""
  c = capture(params, cfg, rows["inputs"], rows["positions"])
  log_z_BxL = jax.nn.logsumexp(c.logits_BxLxV, axis=-1)
  target_logit_BxL = jnp.take_along_axis(c.logits_BxLxV, rows["targets"][..., None], axis=-1)[..., 0]
  top_logits_BxLxK, top_ids_BxLxK = jax.lax.top_k(c.logits_BxLxV, TOP_K)
  lens_ids_MxBxL, lens_probs_MxBxL = lens(params, cfg, c.residual_MxBxLxD)
  scored_BxL = rows["loss_mask"] * (jnp.arange(rows["inputs"].shape[1]) >= 1)
  out = {"nll": log_z_BxL - target_logit_BxL, "top_ids": top_ids_BxLxK,
         "top_probs": jnp.exp(top_logits_BxLxK - log_z_BxL[..., None]),
         "lens_ids": lens_ids_MxBxL, "lens_probs": lens_probs_MxBxL,
         "heads": head_sums(c.probs_NxBxHxLxS, scored_BxL)}
  if keep_maps:
    out["maps"] = c.probs_NxBxHxLxS
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class Inspection:
  """A text as the model reads it; per-token arrays are indexed by the text's token (n), lens arrays are M x n."""

  ids: np.ndarray
  pieces: list[str]
  nll: np.ndarray
  top_ids: np.ndarray
  top_probs: np.ndarray
  lens_ids: np.ndarray
  lens_probs: np.ndarray
  heads: dict[str, np.ndarray]  # HEAD_STATS -> N x H means over the scored queries
  maps: np.ndarray  # N x H x m x m: the first window's attention, m its tokens
  map_labels: list[str]  # the first window's m input tokens (the conditioning token first)
  num_bytes: int
  seq_len: int
  stride: int
  windows: int

  @property
  def mean_loss(self) -> float:
    return float(np.sum(self.nll, dtype=np.float64)) / len(self.nll)

  @property
  def bits_per_byte(self) -> float:
    return float(np.sum(self.nll, dtype=np.float64)) / math.log(2) / max(self.num_bytes, 1)


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
  """The text each token adds, decoded after a few tokens of context (leading spaces and split characters right);
  a token that adds no whole character shows as its vocabulary piece."""
  pieces = []
  for i in range(len(ids)):
    context = list(ids[max(0, i - PIECE_CONTEXT):i])
    before, after = tokenizer.decode(context), tokenizer.decode([*context, ids[i]])
    added = after[len(before):] if after.startswith(before) and "\ufffd" not in after[len(before):] else ""
    pieces.append(added or tokenizer.id_to_piece(ids[i]))
  return pieces


def check_text(text: str, num_ids: int, seq_len: int, stride: int) -> None:
  """One-line errors for text the model cannot read as asked."""
  if not text.strip() or num_ids == 0:
    raise errors.DataError("the text is empty (after cleaning); pass some text with --text or --text_file")
  if not 0 <= stride <= seq_len:
    raise errors.ConfigError(f"--stride={stride} must be between 1 and the window --seq_len={seq_len} (0: one window)")
  if stride == 0 and num_ids > seq_len:
    raise errors.ConfigError(f"the text has {num_ids} tokens, more than the model's window of --seq_len={seq_len}; "
                             f"pass --stride (e.g. --stride={max(seq_len // 2, 1)}) to read it in overlapping "
                             "windows, or shorten it")


def inspect_text(params: Any, cfg: ModelConfig, tokenizer: Any, text: str, *, seq_len: int,
                 stride: int = 0) -> Inspection:
  """Reads `text` (one document) in windows as `llm_jax.evaluate` does; stride 0: the text must fit one window."""
  doc_eval.check_seq_len(cfg, seq_len)
  ids = tokenizer.encode_batch([text])[0]
  check_text(text, len(ids), seq_len, stride)
  start_id = scoring.conditioning_id(tokenizer)
  rows = scoring.layout_rows(doc_eval.document_windows(ids, start_id, seq_len, stride or seq_len), seq_len)
  cfg = reference_config(cfg)
  per_token: dict[str, list[np.ndarray]] = {k: [] for k in ("nll", "top_ids", "top_probs", "lens_ids", "lens_probs")}
  sums, maps = None, None
  for r in range(len(rows["inputs"])):
    row = {k: jnp.asarray(v[r:r + 1]) for k, v in rows.items()}
    out = jax.device_get(analyse_rows(params, row, cfg=cfg, keep_maps=r == 0))
    scored = rows["loss_mask"][r] > 0
    for k in ("nll", "top_ids", "top_probs"):
      per_token[k].append(out[k][0][scored])
    for k in ("lens_ids", "lens_probs"):
      per_token[k].append(out[k][:, 0][:, scored])
    sums = out["heads"] if sums is None else jax.tree.map(np.add, sums, out["heads"])
    if r == 0:
      m = int(scored.sum())
      maps = out["maps"][:, 0, :, :m, :m]
  pieces = token_pieces(tokenizer, ids)
  count = max(float(sums.pop("count")), 1.0)
  return Inspection(
      ids=np.asarray(ids), pieces=pieces,
      **{k: np.concatenate(v, axis=-1 if k.startswith("lens") else 0) for k, v in per_token.items()},
      heads={k: np.asarray(v, np.float64) / count for k, v in sums.items()}, maps=maps,
      map_labels=[tokenizer.id_to_piece(start_id), *pieces[:maps.shape[-1] - 1]],
      num_bytes=len(text.encode("utf-8")), seq_len=seq_len, stride=stride or seq_len, windows=len(rows["inputs"]))


def head_kind(stats: dict[str, float]) -> str:
  """A head's most visible habit: 'broad' when it spreads nearly evenly over what it sees (entropy at least 90% of
  uniform), else where most of its attention goes (the first token, the previous one, itself, the last LOCAL_KEYS),
  else 'selective' (it picks tokens by content)."""
  if stats["entropy"] >= 0.9 * stats["uniform_entropy"]:
    return "broad"
  weight, kind = max((stats["first"], "first-token"), (stats["previous"], "previous-token"), (stats["self"], "self"))
  if weight >= 0.5:
    return kind
  return "local" if stats["local"] >= 0.5 else "selective"


def head_table(heads: dict[str, np.ndarray]) -> list[dict[str, Any]]:
  """One record per (layer, head), layers counted from 1, with its HEAD_STATS and `head_kind`."""
  n, h = heads["entropy"].shape
  records = []
  for layer in range(n):
    for head in range(h):
      stats = {name: float(heads[name][layer, head]) for name in HEAD_STATS}
      records.append({"layer": layer + 1, "head": head, **stats, "kind": head_kind(stats)})
  return records


def largest_differences(nll_a: np.ndarray, nll_b: np.ndarray, top: int) -> list[int]:
  """Token positions where the two models' losses differ most (by absolute difference), largest first."""
  diff = np.asarray(nll_b, np.float64) - np.asarray(nll_a, np.float64)
  return [int(i) for i in np.argsort(-np.abs(diff), kind="stable")[:top]]
