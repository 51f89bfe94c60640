"""A plain PyTorch GPT-2 and AdamW step at our shapes and hyper-parameters, initialised from our parameters.

It is the second implementation our train step is checked and timed against (tests/test_torch_reference.py,
tools/compare_torch.py). It mirrors `llm_jax.model` for the gpt2 family only: tied embeddings, learned
positions, pre-LayerNorm blocks with biases, tanh-GELU MLP, causal attention that never crosses packed
documents, a final LayerNorm; and `llm_jax.optim`: global-norm clipping, then AdamW with decoupled weight
decay that skips norms, biases and the position table, on a warm-up + constant/linear/cosine schedule that
is written out again here rather than imported. torch is a test and bench dependency only: nothing in
llm_jax imports this file.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llm_jax import errors
from llm_jax.hf import weights as hf_weights
from llm_jax.model_config import ModelConfig
from llm_jax.optim import OptimConfig


class Block(nn.Module):
  """One pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    d, width = cfg.d_model, cfg.num_heads * cfg.head_dim
    self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
    self.ln_1 = nn.LayerNorm(d, eps=cfg.norm_eps)
    self.qkv = nn.Linear(d, 3 * width)  # one matmul for q, k and v: what a plain torch GPT-2 does
    self.out = nn.Linear(width, d)
    self.ln_2 = nn.LayerNorm(d, eps=cfg.norm_eps)
    self.fc = nn.Linear(d, cfg.d_ff)
    self.proj = nn.Linear(cfg.d_ff, d)

  def forward(self, x_BxLxD: torch.Tensor, mask_Bx1xLxS: torch.Tensor) -> torch.Tensor:
    b, l, _ = x_BxLxD.shape
    qkv = self.qkv(self.ln_1(x_BxLxD)).view(b, l, 3, self.heads, self.head_dim)
    q_BxHxLxK, k_BxHxSxK, v_BxHxSxK = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    out_BxHxLxK = F.scaled_dot_product_attention(q_BxHxLxK, k_BxHxSxK, v_BxHxSxK, attn_mask=mask_Bx1xLxS)
    x_BxLxD = x_BxLxD + self.out(out_BxHxLxK.transpose(1, 2).reshape(b, l, -1))
    h_BxLxF = F.gelu(self.fc(self.ln_2(x_BxLxD)), approximate="tanh")
    return x_BxLxD + self.proj(h_BxLxF)


class TorchGPT(nn.Module):
  """Token ids (with per-document positions and segment ids) in, next-token logits out."""

  def __init__(self, cfg: ModelConfig):
    super().__init__()
    if cfg.family != "gpt2" or not cfg.tie_embeddings or cfg.num_kv_heads != cfg.num_heads:
      raise errors.ConfigError("the torch reference is the gpt2 family with tied embeddings and num_kv_heads == "
                               "num_heads")
    self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
    self.wpe = nn.Embedding(cfg.max_len, cfg.d_model)
    self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
    self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)

  def forward(self, tokens_BxL: torch.Tensor, positions_BxL: torch.Tensor,
              segment_ids_BxL: torch.Tensor) -> torch.Tensor:
    l = tokens_BxL.shape[1]
    # Causal by slot and never across documents, as llm_jax.attention.attention_mask: True = may attend.
    causal_LxS = torch.ones(l, l, dtype=torch.bool, device=tokens_BxL.device).tril()
    same_doc_BxLxS = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
    mask_Bx1xLxS = (causal_LxS & same_doc_BxLxS)[:, None]
    x_BxLxD = self.wte(tokens_BxL) + self.wpe(positions_BxL)
    for block in self.blocks:
      x_BxLxD = block(x_BxLxD, mask_Bx1xLxS)
    return self.ln_f(x_BxLxD) @ self.wte.weight.T  # tied output projection


def load_our_params(model: TorchGPT, params: Any, cfg: ModelConfig) -> None:
  """Copies our parameter tree into `model`, through the Hugging Face GPT-2 names `params_to_hf` gives."""
  hf = {name.removeprefix(hf_weights.GPT2_PREFIX): x for name, x in hf_weights.params_to_hf(params, cfg).items()}
  # HF GPT-2 stores Conv1D weights as (in, out); torch Linear wants (out, in).
  names = {"ln_1": "ln_1", "attn.c_attn": "qkv", "attn.c_proj": "out", "ln_2": "ln_2", "mlp.c_fc": "fc",
           "mlp.c_proj": "proj"}
  state = {"wte.weight": hf.pop("wte.weight"), "wpe.weight": hf.pop("wpe.weight"),
           "ln_f.weight": hf.pop("ln_f.weight"), "ln_f.bias": hf.pop("ln_f.bias")}
  for i in range(cfg.num_layers):
    for theirs, ours in names.items():
      weight, bias = hf.pop(f"h.{i}.{theirs}.weight"), hf.pop(f"h.{i}.{theirs}.bias")
      state[f"blocks.{i}.{ours}.weight"] = weight if theirs.startswith("ln_") else weight.T
      state[f"blocks.{i}.{ours}.bias"] = bias
  if hf:
    raise ValueError(f"weights left unloaded: {sorted(hf)[:3]}")
  model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}, strict=True)


def learning_rate(o: OptimConfig, num_steps: int, step: int) -> float:
  """The rate at `step` (0-based: the update about to be applied), written from optim.make_schedule's definition."""
  peak, warmup = o.learning_rate, o.warmup_steps
  if step < warmup:
    return peak * step / warmup
  t, after = step - warmup, max(num_steps - warmup, 1)
  frac = min(t, after) / after
  if o.schedule == "constant":
    return peak
  if o.schedule == "linear":
    return peak + (peak * o.min_lr_ratio - peak) * frac
  if o.schedule == "cosine":
    return peak * ((1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)) + o.min_lr_ratio)
  raise errors.ConfigError(f"the torch reference has no schedule {o.schedule!r}; use constant, linear or cosine")


def make_optimizer(model: TorchGPT, o: OptimConfig) -> torch.optim.AdamW:
  """AdamW with decoupled decay on the weight matrices and the token embedding only (llm_jax.optim.decay_mask)."""
  if o.name != "adamw":
    raise errors.ConfigError(f"the torch reference runs adamw, not {o.name!r}")
  no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or ".ln_" in f".{n}" or n == "wpe.weight"]
  ids = {id(p) for p in no_decay}
  decay = [p for p in model.parameters() if id(p) not in ids]
  # optax scales the decay by the learning rate as torch does: p -= lr * (adam + wd * p).
  return torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=o.learning_rate, betas=(o.b1, o.b2), eps=o.eps, foreach=True)


def to_torch(batch: dict[str, np.ndarray], device: str = "cpu") -> dict[str, torch.Tensor]:
  """A batch of llm_jax.batch arrays as torch tensors (int64 ids, which embedding lookups want)."""
  out = {k: torch.from_numpy(np.array(v)).to(device) for k, v in batch.items()}  # a copy: pipeline arrays are read-only
  for k in ("inputs", "targets", "positions", "segment_ids"):
    out[k] = out[k].long()
  return out


def loss_sums(model: TorchGPT, batch: dict[str, torch.Tensor], autocast_bf16: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
  """Summed masked next-token NLL (float32) and the number of counted targets."""
  device = batch["inputs"].device.type
  with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast_bf16):
    logits_BxLxV = model(batch["inputs"], batch["positions"], batch["segment_ids"])
  nll_BxL = F.cross_entropy(logits_BxLxV.float().flatten(0, 1), batch["targets"].flatten(), reduction="none")
  mask = batch["loss_mask"].flatten().float()
  return (nll_BxL * mask).sum(), mask.sum()


class TorchTrainer:
  """Our train step's semantics in torch: mean loss, global-norm clip, scheduled AdamW; one `step` per batch."""

  def __init__(self, cfg: ModelConfig, o: OptimConfig, num_steps: int, params: Any, device: str = "cpu",
               autocast_bf16: bool = False):
    self.model = TorchGPT(cfg)
    load_our_params(self.model, params, cfg)
    self.model.to(device)
    self.o, self.num_steps, self.autocast_bf16 = o, num_steps, autocast_bf16
    self.optimizer = make_optimizer(self.model, o)
    self.step_count = 0

  def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One update; returns the batch's mean loss as a tensor (no host sync, so a loop can be timed fairly)."""
    nll, count = loss_sums(self.model, batch, self.autocast_bf16)
    loss = nll / count.clamp(min=1.0)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if self.o.grad_clip_norm > 0:
      self._clip(self.o.grad_clip_norm)
    for group in self.optimizer.param_groups:
      group["lr"] = learning_rate(self.o, self.num_steps, self.step_count)
    self.optimizer.step()
    self.step_count += 1
    return loss.detach()

  def _clip(self, max_norm: float) -> None:
    # optax.clip_by_global_norm: scale by max/norm only when norm >= max, with no epsilon (torch's adds 1e-6).
    grads = [p.grad for p in self.model.parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = torch.where(norm < max_norm, torch.ones_like(norm), max_norm / norm)
    torch._foreach_mul_(grads, scale)

  @torch.no_grad()
  def evaluate(self, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean validation loss over fixed batches, summed over all counted targets as llm_jax.loop.evaluate does."""
    nll_total, count_total = 0.0, 0.0
    for batch in batches:
      nll, count = loss_sums(self.model, batch, self.autocast_bf16)
      nll_total, count_total = nll_total + float(nll), count_total + float(count)
    return nll_total / max(count_total, 1.0)
