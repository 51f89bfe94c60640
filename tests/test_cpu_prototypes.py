"""The CPU lever prototypes (experiments/cpu_prototypes.py) compute what the model computes: same loss and same
gradients as plain autodiff of the unpatched model, for both families, so a speed ratio measured with them
compares like with like."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from llm_jax import config as config_lib
from llm_jax import model as model_lib

sys.path.insert(0, os.path.join(REPO, "experiments"))
import cpu_prototypes  # noqa: E402  pylint: disable=wrong-import-position


def _loss_and_grads(cfg: model_lib.ModelConfig, params, tokens_BxL):
  def loss(p):
    logits_BxLxV, _ = model_lib.Transformer(cfg).apply({"params": p}, tokens_BxL[:, :-1])
    logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32))
    return -jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1).mean()
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("prototype", cpu_prototypes.PROTOTYPES)
def test_prototype_matches_the_model(prototype, family):
  c = config_lib.from_file(os.path.join(REPO, "experiments", "smoke.py"))
  c.model.family = family
  c.model.num_kv_heads = 2 if family == "llama" else 0  # grouped heads exercise the repeat axis
  c.model.tie_embeddings = family == "gpt2"  # tied logits stay a plain einsum; the untied head is patched
  cfg = config_lib.model_config(c, 512)
  tokens_BxL = jnp.asarray(np.random.default_rng(0).integers(0, 512, (4, 33)))
  params = model_lib.Transformer(cfg).init(jax.random.key(0), tokens_BxL[:, :-1])["params"]
  forward = lambda p: model_lib.Transformer(cfg).apply({"params": p}, tokens_BxL[:, :-1])[0]
  want_loss, want_grads = _loss_and_grads(cfg, params, tokens_BxL)
  plain = str(jax.make_jaxpr(forward)(params))
  with cpu_prototypes.patched(prototype):
    got_loss, got_grads = _loss_and_grads(cfg, params, tokens_BxL)
    patched = str(jax.make_jaxpr(forward)(params))
  assert patched != plain  # the prototype is what ran
  assert float(got_loss) == pytest.approx(float(want_loss), abs=1e-6)
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(want_grads), jax.tree.leaves(got_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_the_patch_is_undone_and_unknown_names_refused():
  for name in cpu_prototypes.PROTOTYPES:
    attr = cpu_prototypes.PATCHES[name][0]
    original = getattr(model_lib, attr)
    with cpu_prototypes.patched(name):
      assert getattr(model_lib, attr) is not original
    assert getattr(model_lib, attr) is original
  with pytest.raises(ValueError, match="--prototype='fused' is unknown"):
    with cpu_prototypes.patched("fused"):
      pass


@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True), (True, True)])
def test_blas_gemm_matches_numpy_with_each_transpose(trans_a, trans_b):
  import blas_ffi  # pylint: disable=import-outside-toplevel  # builds the FFI library on first use
  rng = np.random.default_rng(1)
  a_MxK, b_KxN = rng.standard_normal((37, 19), dtype=np.float32), rng.standard_normal((19, 23), dtype=np.float32)
  a = a_MxK.T.copy() if trans_a else a_MxK
  b = b_KxN.T.copy() if trans_b else b_KxN
  got = jax.jit(lambda x, y: blas_ffi.gemm(x, y, trans_a, trans_b))(a, b)
  assert got.shape == (37, 23)
  np.testing.assert_allclose(np.asarray(got), a_MxK.astype(np.float64) @ b_KxN, rtol=1e-4, atol=1e-4)
