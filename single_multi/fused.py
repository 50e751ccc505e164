"""One round of the loop as one program (`config.fused_round`).

`round_program` collaborates on all dev rows, builds the distillation method's rows in token space
(`rows.METHODS[...].traced`: the output tokens exactly as generated, ending in eos), runs every
optimizer step of the distillation in a `lax.scan` (`distill.program`), and decodes the test rows
with the distilled singles and the collaboration. `fused_round` is its host side: tokenisation
before, text scoring after. Strategies fitted on dev refit on the host before the test
evaluation, and multi_student_kd's best student is picked from the singles' dev answers scored as
text before the round program (two programs per round). The staged loop (`evolve.py`) computes
the same round as separate stages; tests/test_evolve.py checks that both give the same records.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from single_multi import collab, decoding, distill, evaluate, pool as pool_lib
from single_multi import rows as rows_lib
from single_multi.data import pipeline
from single_multi.rows import own_half

if TYPE_CHECKING:
  from single_multi.evolve import Loop


def _round_program(params_n, dev, test, order, keys, state, students=None, *, strategy, cfg, env,
                   dcfg, eos, evaluate_test, policy_sampler=None):
  """Collaborate on all dev rows -> the method's rows (`rows.METHODS[...].traced`) -> every
  optimizer step of the vmapped pool distillation (`distill.program`) -> [the distilled singles
  and the collaboration answer all test rows]. keys: per-row sampling keys {"dev_collab",
  "policy": [R]; "test_singles", "test_collab": [T]} (`Loop.key`, as the staged stages use
  them). students: multi_student_kd's singles' dev answers (`rows.TracedInputs`);
  policy_sampler: on_policy_kd's students' sampler."""
  run = collab.get(strategy).run
  out = run(params_n, dev, keys["dev_collab"], cfg=cfg, env=env, state=state)
  method = rows_lib.method(dcfg.method)
  if method.traced is None:  # `validate` refuses this before anything loads.
    raise NotImplementedError(f"the fused round builds no rows for distill.method="
                              f"{dcfg.method!r}; run it with fused_round=False")
  data = method.traced(rows_lib.TracedInputs(params_n, dev, out, keys, state, students, strategy,
                                             cfg, env, eos, policy_sampler))
  tail = rows_lib.traced_tail(method, env.max_new_tokens)
  per_model = data["tokens"].ndim == 3  # [N, R, T]: each model trains on its own rows.
  params_n, losses = distill.program(params_n, data, order, env.config, dcfg, tail, per_model)
  result = {"params": params_n, "losses": losses, "data": data,
            "dev": (out.tokens, out.lengths)}
  if evaluate_test:
    singles = pool_lib.decode_each(params_n, test.prompt, test.prompt_mask, keys["test_singles"],
                                   sampler=env.sampler, **env.decode_kw)
    together = run(params_n, test, keys["test_collab"], cfg=cfg, env=env, state=state)
    result["singles"] = (singles.tokens, singles.lengths)
    result["collab"] = (together.tokens, together.lengths)
  return result


round_program = jax.jit(_round_program, static_argnames=(
    "strategy", "cfg", "env", "dcfg", "eos", "evaluate_test", "policy_sampler"))


def fused_round(loop: Loop, pool, out_dir):
  """One round through `round_program`: tokenisation before (all dev rows, all test rows as one
  batch each), text scoring after. Where the round needs the singles' dev answers scored (a
  strategy fitted on dev; multi_student_kd's best student) they are decoded first, in token
  space, and scored on the host: two programs. A strategy fitted on dev is refitted on the host
  with the distilled models before the test evaluation, which then runs as its own programs
  (`Loop.singles` / `Loop.collaboration`). Returns (the distilled pool, singles and
  collaboration test results, distillation losses [steps, N]); the dev collaboration's records go
  to out_dir/collaboration_dev, the singles' dev answers (when decoded) to out_dir/singles_dev."""
  config, spec = loop.config, loop.spec
  dcfg, method = spec.dcfg, rows_lib.method(spec.dcfg.method)
  env = collab.make_env(pool, config.strategy, spec.scfg, max_new_tokens=config.max_new_tokens,
                        sampler=spec.sampler, return_rows=method.returns_rows)
  dev_data = rows_lib.dev_batch(loop)
  test_data = next(iter(pipeline.generation_batches(loop.test, loop.prompter,
                                                    batch_size=len(loop.test))))
  dev_batch = collab.batch_from(dev_data)
  kw = dict(method="generate", metric=loop.task.spec.metric, task_name=loop.task.name,
            seed=config.seed, reference=loop.dev, reward_model=loop.reward_model)

  def scored(data, examples, names, out, split, directory):
    rows = [int(i) for i in data["index"] if i >= 0]
    tokens, lengths = (np.asarray(x) for x in out)
    if tokens.ndim == 2:  # The collaboration's [B, M]: one "model".
      tokens, lengths = tokens[None], lengths[None]
    records = evaluate.generation_records(examples, rows, names, tokens, lengths,
                                          pool.tokenizer, loop.task.spec.metric)
    return evaluate.finish(records, examples, names, split=split, output_dir=directory, **kw)

  def keys_for(data, examples, purpose):
    return evaluate.example_keys(loop.key(purpose), [examples[i] if i >= 0 else None
                                                     for i in data["index"]])

  scores, students = None, None
  if loop.needs_dev_singles():
    out = pool_lib.decode_each(pool.params, dev_batch.prompt, dev_batch.prompt_mask,
                               keys_for(dev_data, loop.dev, "dev_singles"), sampler=env.sampler,
                               **env.decode_kw)
    scores = evaluate.scores_matrix(scored(dev_data, loop.dev, pool.names, (out.tokens, out.lengths),
                                   "dev", out_dir / "singles_dev"), pool.names, loop.dev)
    if method.own_answers:
      students = (out.tokens, out.lengths, jnp.asarray(np.argmax(scores.mean(axis=1))),
                  jnp.asarray(own_half(loop)[dev_data["index"]]))  # In the batch's row order.
  state = loop.fit(pool, scores)
  refit = collab.get(config.strategy).fit is not None
  rows = len(loop.dev) * (2 if students is not None else 1)
  order = distill.step_order(rows, dcfg)
  keys = {"dev_collab": keys_for(dev_data, loop.dev, "dev_collab"),
          "policy": keys_for(dev_data, loop.dev, "policy"),
          "test_singles": keys_for(test_data, loop.test, "test_singles"),
          "test_collab": keys_for(test_data, loop.test, "test_collab")}
  res = round_program(pool.params, dev_batch, collab.batch_from(test_data),
                      jnp.asarray(order), keys, state, students, strategy=config.strategy,
                      cfg=spec.scfg, env=env, dcfg=dcfg,
                      eos=decoding.stop_ids_for(pool.config, pool.tokenizer)[0],
                      evaluate_test=not refit,
                      policy_sampler=spec.policy_sampler if method.needs_combine else None)
  losses = np.asarray(res["losses"])
  distill.check_finite(losses)
  distill.check_converging(losses, distill.param_norms(pool.params),
                           distill.param_norms(res["params"]), pool.config.vocab_size,
                           dcfg.optim.learning_rate, dcfg.max_norm_growth)
  pool = dataclasses.replace(pool, params=res["params"])
  scored(dev_data, loop.dev, (config.strategy,), res["dev"], "dev",
         out_dir / "collaboration_dev")
  if refit:
    singles, collab_r = loop.evaluate_test(pool, out_dir)
  else:
    singles = scored(test_data, loop.test, pool.names, res["singles"], "test",
                     out_dir / "singles")
    collab_r = scored(test_data, loop.test, (config.strategy,), res["collab"], "test",
                      out_dir / "collaboration")
  return pool, singles, collab_r, losses
