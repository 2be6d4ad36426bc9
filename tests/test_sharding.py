"""Sharded forwards on a (2, 2, 2) mesh of 8 simulated CPU devices equal the single-device ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from specjax.errors import SpecjaxError
from specjax.models.llama import KVCache
from specjax.sharding import batch_sharding, cache_sharding, logical_spec, make_mesh, param_logical_axes, shard_model
from tests.helpers import flat_params, max_abs_diff, random_model, random_tokens, tiny_config

TOL = 1e-5
BATCH = 4  # divisible by data * fsdp = 4, so the batch is split over both axes


@jax.jit
def _forward(graphdef, state, tokens_BT):
  return nnx.merge(graphdef, state)(tokens_BT)


@jax.jit
def _cached_forward(graphdef, state, tokens_BT, cache):
  return nnx.merge(graphdef, state)(tokens_BT, cache)


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
  return make_mesh((2, 2, 2))


@pytest.fixture(scope="module")
def models(mesh):
  """(single-device model, the same weights sharded over the mesh)."""
  config = tiny_config()
  single = random_model(config, seed=11)
  sharded = shard_model(random_model(config, seed=11), mesh)
  return single, sharded


def test_make_mesh_axes(mesh):
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert make_mesh((2, -1, 1)).shape["fsdp"] == 4
  assert make_mesh().shape["fsdp"] == 8


@pytest.mark.parametrize(
  "shape, words",
  [
    ((3, 1, 1), ["(3, 1, 1)", "needs 3 devices", "8 are available"]),
    ((2, 2, 4), ["(2, 2, 4)", "needs 16 devices", "8 are available"]),
    ((3, -1, 1), ["(3, -1, 1)", "does not divide 8 devices"]),
    ((2, -1, -1), ["at most one -1"]),
    ((2, 4), ["(2, 4)", "expected 3 sizes"]),
  ],
)
def test_make_mesh_errors(shape, words):
  with pytest.raises(SpecjaxError) as e:
    make_mesh(shape)
  for word in words:
    assert word in str(e.value)


def test_logical_spec(mesh):
  # Every axis divides: vocab -> tensor, embed -> fsdp; batch -> (data, fsdp).
  assert logical_spec((256, 64), ("vocab", "embed"), mesh) == P("tensor", "fsdp")
  assert logical_spec((8, 5), ("batch", None), mesh) == P(("data", "fsdp"), None)
  # A mesh axis that does not divide the dimension is dropped (that dimension replicated).
  assert logical_spec((255, 64), ("vocab", "embed"), mesh) == P(None, "fsdp")
  assert logical_spec((256, 63), ("vocab", "embed"), mesh) == P("tensor", None)
  # batch 2: data (2) divides, data * fsdp (4) does not, so only data is used.
  assert logical_spec((2, 7), ("batch", None), mesh) == P("data", None)
  assert logical_spec((1,), ("batch",), mesh) == P(None)
  # A mesh axis is used once per array: the second "mlp" dimension cannot take tensor again.
  assert logical_spec((4, 4), ("mlp", "heads"), mesh) == P("tensor", None)
  # Axes without a rule, and None, replicate.
  assert logical_spec((4, 4), ("head_dim", None), mesh) == P(None, None)
  with pytest.raises(ValueError):
    logical_spec((4, 4), ("embed",), mesh)


def test_param_rules_cover_every_weight(models):
  _, sharded = models
  for name, value in flat_params(sharded).items():
    axes = param_logical_axes(name, value.ndim)
    assert None not in axes, f"{name} has no sharding rule"


def test_shard_model_places_weights(models, mesh):
  single, sharded = models
  q = sharded.layers[0].self_attn.q_proj.kernel[...]  # [embed 64, heads 64] -> (fsdp, tensor)
  assert q.sharding.spec == P("fsdp", "tensor") and not q.sharding.is_fully_replicated
  assert q.addressable_shards[0].data.shape == (32, 32)
  head = sharded.lm_head.kernel[...]  # [embed, vocab]
  assert head.sharding.spec == P("fsdp", "tensor")
  norm = sharded.norm.weight[...]
  assert norm.sharding.is_fully_replicated
  # Same values as the unsharded model.
  a, b = flat_params(single), flat_params(sharded)
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_sharded_forward_matches_single_device(models, mesh):
  single, sharded = models
  tokens = random_tokens((BATCH, 12), 256, 0)
  expected = np.asarray(_forward(*nnx.split(single), jnp.asarray(tokens)))
  tokens_sharded = jax.device_put(jnp.asarray(tokens), batch_sharding(tokens.shape, mesh))
  assert tokens_sharded.sharding.spec == P(("data", "fsdp"), None)
  got = _forward(*nnx.split(sharded), tokens_sharded)
  assert len(got.sharding.device_set) == 8
  diff = max_abs_diff(got, expected)
  assert diff <= TOL, diff
  assert np.abs(expected).max() > 0.5  # not a degenerate all-zero comparison


def test_sharded_cached_forward_matches_single_device(models, mesh):
  single, sharded = models
  config = single.config
  tokens = random_tokens((BATCH, 10), 256, 1)
  prefix, max_len = 6, 16

  def run(model, shard):
    cache = KVCache.zeros(config, BATCH, max_len)
    put = lambda x: x
    if shard:
      cache = jax.device_put(cache, cache_sharding(cache, mesh))
      assert not cache.k_RSE[0].sharding.is_fully_replicated
      put = lambda x: jax.device_put(jnp.asarray(x), batch_sharding(x.shape, mesh))
    graphdef, state = nnx.split(model)
    logits, cache = _cached_forward(graphdef, state, put(tokens[:, :prefix]), cache)
    outs = [np.asarray(logits)]
    for t in range(prefix, tokens.shape[1]):
      logits, cache = _cached_forward(graphdef, state, put(tokens[:, t : t + 1]), cache)
      outs.append(np.asarray(logits))
    return np.concatenate(outs, axis=1), cache

  expected, _ = run(single, shard=False)
  got, cache = run(sharded, shard=True)
  np.testing.assert_array_equal(np.asarray(cache.lengths_B), [tokens.shape[1]] * BATCH)
  diff = max_abs_diff(got, expected)
  assert diff <= TOL, diff
  # And both equal the uncached forward.
  assert max_abs_diff(expected, _forward(*nnx.split(single), jnp.asarray(tokens))) <= TOL


def test_cache_sharding_specs(mesh):
  config = tiny_config()
  cache = KVCache.zeros(config, BATCH, 16)
  shardings = cache_sharding(cache, mesh)
  # Per layer: keys [batch x kv_heads, cache_length, head_dim], values [.., head_dim, cache_length].
  for k, v in zip(shardings.k_RSE, shardings.v_RES):
    assert k.spec == P(("data", "fsdp", "tensor"), None, None)
    assert v.spec == P(("data", "fsdp", "tensor"), None, None)
  assert shardings.lengths_B.spec == P(("data", "fsdp"))
  # 2 rows x 1 kv head = 2 cache rows: only `data` divides them.
  small = KVCache.zeros(config.replace(num_kv_heads=1, num_heads=2), 2, 16)
  assert cache_sharding(small, mesh).k_RSE[0].spec == P("data", None, None)
