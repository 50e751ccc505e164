"""Distillation: KL losses by hand, the vmapped pool step equals training each model alone,
loss on the collaborative outputs drops, sequences carry the prompt exactly."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from single_multi import distill, pool as pool_lib, train as train_lib
from single_multi.models import lora as lora_lib, transformer

from test_co_llm import CONFIG


def test_kl_losses_by_hand():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(1, 2, 5))
  t = rng.normal(size=(1, 2, 5))
  lt = t - np.log(np.exp(t).sum(-1, keepdims=True))
  ls = s - np.log(np.exp(s).sum(-1, keepdims=True))
  w = np.asarray([[1.0, 0.0]])
  fwd = float(distill.forward_kl(jnp.asarray(s), jnp.asarray(lt), jnp.asarray(w)))
  assert fwd == pytest.approx(float((np.exp(lt) * (lt - ls)).sum(-1)[0, 0]), rel=1e-5)
  rev = float(distill.reverse_kl(jnp.asarray(s), jnp.asarray(lt), jnp.asarray(w)))
  assert rev == pytest.approx(float((np.exp(ls) * (ls - lt)).sum(-1)[0, 0]), rel=1e-5)
  assert float(distill.forward_kl(jnp.asarray(s), jnp.asarray(ls), jnp.asarray(w))) == \
      pytest.approx(0.0, abs=1e-6)


def test_cross_entropy_and_its_written_out_gradient_match_torch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(2, 3, 7, 50)) * 8).astype(np.float32)  # [pool, batch, time, vocab]
  targets = rng.integers(0, 50, (2, 3, 7))
  weights = rng.integers(0, 2, (2, 3, 7)).astype(np.float32)
  loss = lambda x: jnp.sum(jax.vmap(train_lib.token_nll)(x, jnp.asarray(targets),
                                                         jnp.asarray(weights)))
  value, grad = jax.jit(jax.value_and_grad(loss))(jnp.asarray(logits))
  x = torch.tensor(logits, requires_grad=True)
  per = torch.nn.functional.cross_entropy(x.reshape(-1, 50), torch.tensor(targets).reshape(-1),
                                          reduction="none").reshape(2, 3, 7)
  w = torch.tensor(weights)
  ref = ((per * w).sum((1, 2)) / w.sum((1, 2)).clamp(min=1)).sum()
  ref.backward()
  np.testing.assert_allclose(float(value), ref.item(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), x.grad.numpy(), atol=1e-7)
  # bf16 logits: the loss is taken in fp32 and the gradient comes back in bf16, so it equals
  # torch's on the same (bf16-rounded) logits up to bf16's rounding of the result (2^-8 rel).
  l16 = jnp.asarray(logits[0], jnp.bfloat16)
  g16 = jax.grad(lambda x: train_lib.token_nll(x, jnp.asarray(targets[0]),
                                               jnp.asarray(weights[0])))(l16)
  assert g16.dtype == jnp.bfloat16
  x16 = torch.tensor(np.asarray(l16, np.float32), requires_grad=True)
  per = torch.nn.functional.cross_entropy(x16.reshape(-1, 50),
                                          torch.tensor(targets[0]).reshape(-1), reduction="none")
  ((per * w[0].reshape(-1)).sum() / w[0].sum().clamp(min=1)).backward()
  np.testing.assert_allclose(np.asarray(g16, np.float32), x16.grad.numpy(), rtol=2 ** -8,
                             atol=1e-7)


def test_sequences_keep_the_prompt_and_mask_only_the_output():
  prompt = jnp.asarray([[0, 0, 5, 6], [7, 8, 9, 10]])
  pmask = jnp.asarray([[0, 0, 1, 1], [1, 1, 1, 1]])
  out = jnp.asarray([[11, 12, 3], [13, 3, 0]])
  tokens, mask, loss = distill.sequences(prompt, pmask, out, jnp.asarray([3, 2]))
  assert tokens.tolist() == [[0, 0, 5, 6, 11, 12, 3], [7, 8, 9, 10, 13, 3, 0]]
  assert mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0]]
  assert loss.tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0]]


def _data(n=12, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, 30, (n, 10)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[::3, :2] = 0
  loss_mask = np.zeros_like(tokens)
  loss_mask[:, 6:] = 1
  return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}


@pytest.mark.parametrize("lora", [None, lora_lib.LoraConfig(rank=4, alpha=8.0, dropout=0.1)])
def test_vmapped_pool_training_equals_training_each_model_alone(lora):
  members = [transformer.init_params(CONFIG, jax.random.key(s)) for s in (0, 1)]
  params_n = pool_lib.stack(members)
  cfg = distill.DistillConfig(lora=lora, batch_size=2, epochs=1.0,
                              optim=train_lib.OptimConfig(learning_rate=1e-2, accumulation=2))
  data = _data()
  new_n, state, history = distill.distill(params_n, data, CONFIG, cfg, progress=False)
  steps = distill.num_steps(12, cfg)
  assert state.step == steps == 3 and len(history) == steps
  loss_fn = distill.make_loss(CONFIG, "supervised_kd", lora,
                              train_lib.loss_tail(data["loss_mask"]))
  optimizer = train_lib.make_optimizer(cfg.optim, steps)
  step_fn = train_lib.make_train_step(loss_fn, optimizer, 2)
  order = np.random.default_rng(cfg.seed).permutation(12)
  for i, params in enumerate(members):
    trainable = (jax.tree.map(jnp.copy, params) if lora is None else
                 lora_lib.init(CONFIG, lora, jax.random.split(jax.random.key(cfg.seed), 2)[i]))
    opt_state = optimizer.init(trainable)
    for step in range(steps):
      idx = order[step * 4:(step + 1) * 4]
      batch = {k: v[idx] for k, v in data.items()}
      key = jax.random.split(jax.random.fold_in(jax.random.key(cfg.seed), step), 2)[i]
      trainable, opt_state, _ = step_fn(trainable, opt_state, None if lora is None else params,
                                        batch, key)
    alone = trainable if lora is None else lora_lib.merge(params, trainable, lora)
    together = jax.tree.map(lambda x: x[i], new_n)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), alone,
                 together)


def test_distillation_lowers_the_loss_on_the_outputs_and_resumes():
  params_n = pool_lib.stack([transformer.init_params(CONFIG, jax.random.key(s)) for s in (0, 1)])
  cfg = distill.DistillConfig(lora=None, batch_size=4, epochs=10.0,
                              optim=train_lib.OptimConfig(learning_rate=1e-2, accumulation=1))
  data = _data(8)
  _, state, history = distill.distill(params_n, data, CONFIG, cfg, progress=False)
  first, last = np.asarray(history[0]["loss"]), np.asarray(history[-1]["loss"])
  assert (last < 0.7 * first).all(), (first, last)
  # Resume from a mid-run state: the same final params as the uninterrupted run.
  saved = []
  copy = lambda tree: jax.tree.map(lambda x: np.array(x, copy=True), tree)  # Before donation.
  distill.distill(params_n, data, CONFIG, cfg, progress=False,
                  on_step=lambda s: saved.append((copy(s.trainable), copy(s.opt_state), s.step))
                  if s.step == 9 else None)
  trainable, opt_state, step = saved[0]
  mid = distill.DistillState(jax.tree.map(jnp.asarray, trainable),
                             jax.tree.map(jnp.asarray, opt_state), step)
  resumed, state2, _ = distill.distill(params_n, data, CONFIG, cfg, progress=False, state=mid)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state.trainable,
               state2.trainable)


def test_a_loss_collapsing_to_uniform_stops_at_its_step():
  """Trained to a low loss, then a step size that wrecks the weights: the guard stops at the
  first step whose loss rose 1 nat above the stage's first and reached 0.9 ln(V), before the
  stage ends (nothing after it runs), naming the step and the learning rate."""
  params_n = pool_lib.stack([transformer.init_params(CONFIG, jax.random.key(s)) for s in (0, 1)])
  data = _data(8)
  good = distill.DistillConfig(lora=None, batch_size=4, epochs=10.0,
                               optim=train_lib.OptimConfig(learning_rate=1e-2))
  trained, _, history = distill.distill(params_n, data, CONFIG, good, progress=False)
  assert max(history[-1]["loss"]) < 0.9 * np.log(CONFIG.vocab_size) - 1.0
  # The weight-norm half off (a factor no step reaches), so the loss half is what stops it.
  wild = distill.DistillConfig(lora=None, batch_size=4, epochs=10.0, max_norm_growth=1e30,
                               optim=train_lib.OptimConfig(learning_rate=30.0, clip_norm=0.0,
                                                           warmup_fraction=0.0))
  steps = []
  with pytest.raises(distill.Diverged, match=r"diverged at step \d+: loss .*learning_rate "
                     r"\(now 30\)"):
    distill.distill(trained, data, CONFIG, wild, progress=False,
                    on_step=lambda s: steps.append(s.step))
  assert 0 < len(steps) < distill.num_steps(8, wild), steps
  # With the default factor (10) the weight norm stops the same run at its first step.
  steps = []
  with pytest.raises(distill.Diverged, match=r"diverged at step 0: weight norm of model\(s\) "
                     r"\[0, 1\]"):
    distill.distill(trained, data, CONFIG, dataclasses.replace(wild, max_norm_growth=10.0),
                    progress=False, on_step=lambda s: steps.append(s.step))
  assert steps == []
  # The rule by hand: 1 nat above the first loss and at 0.9 ln(V) or more (V = 260: 5.005).
  first = np.asarray([1.0, 4.5])
  distill.check_step(first, np.asarray([1.9, 5.4]), 3, 260, 1e-4)
  with pytest.raises(distill.Diverged, match=r"step 3: loss of model\(s\) \[1\]"):
    distill.check_step(first, np.asarray([1.9, 5.6]), 3, 260, 1e-4)
  # The weight-norm half: more than max_norm_growth times the stage's starting norm (10 here).
  norm0 = np.asarray([2.0, 3.0])
  distill.check_step(first, first, 4, 260, 1e-4, norm0, np.asarray([20.0, 29.9]), 10.0)
  with pytest.raises(distill.Diverged, match=r"step 4: weight norm of model\(s\) \[1\] grew from "
                     r"\[3\] to \[30.5\], more than distill.max_norm_growth=10 times"):
    distill.check_step(first, first, 4, 260, 1e-4, norm0, np.asarray([20.0, 30.5]), 10.0)
  with pytest.raises(ValueError, match="max_norm_growth=1.0: give a factor > 1"):
    distill.DistillConfig(max_norm_growth=1.0)


def test_the_step_reports_each_models_weight_norm():
  """The step's `param_norm` metric is each member's global norm after its update (with LoRA:
  base and adapters together), against a norm taken by hand from the returned params."""
  params_n = pool_lib.stack([transformer.init_params(CONFIG, jax.random.key(s)) for s in (0, 1)])
  cfg = distill.DistillConfig(lora=None, batch_size=4, epochs=1.0,
                              optim=train_lib.OptimConfig(learning_rate=1e-2))
  trained, _, history = distill.distill(params_n, _data(8), CONFIG, cfg, progress=False)
  by_hand = [np.sqrt(sum(float(np.sum(np.square(np.asarray(x[i], np.float64))))
                         for x in jax.tree.leaves(trained))) for i in range(2)]
  np.testing.assert_allclose(history[-1]["param_norm"], by_hand, rtol=1e-5)
  lora = distill.DistillConfig(batch_size=4, epochs=1.0)  # LoRA: the base's norm plus adapters.
  _, state, history = distill.distill(params_n, _data(8), CONFIG, lora, progress=False)
  base = distill.param_norms(params_n)
  adapters = distill.param_norms(state.trainable)
  np.testing.assert_allclose(history[-1]["param_norm"], np.sqrt(base**2 + adapters**2),
                             rtol=1e-5)
