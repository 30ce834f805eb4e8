"""The training loop, top to bottom: mesh, data, model and optimizer, restore, step functions, loop.

`python -m s5scale.train` (s5scale/train.py) calls `train`. Relaunching with the same workdir
resumes from the latest complete checkpoint.
"""

import time

import flax.linen as nn
import jax
from absl import logging

from s5scale import checkpoint, cli, config_check, data, evaluation, metrics, optim, parallel
from s5scale import preflight, steps, storage
from s5scale.nn.model import S5Model


def train(config, workdir: str, preemption) -> int:
  """Trains config's model in workdir; 0 when finished or preempted with a checkpoint saved.

  preemption: a preemption.PreemptionWatcher, installed by the program before JAX starts.
  """
  started = time.time()   # elapsed_s in metrics.jsonl: this run's wall time, compilation included

  # ---------------------------------------------------------------- Checks (nothing written yet)
  preflight.check_workdir(workdir)
  parallel.initialize_distributed()
  preemption.connect(parallel.launched_process_count())
  data.fill_num_classes(config)
  config_check.check_on_devices(config, jax.devices(), jax.process_count())
  preflight.check_resume(config, workdir)
  preflight.check_heldout(config)
  cli.setup_logging(workdir, "train")
  checkpoint.clear_run_status(workdir)

  # ---------------------------------------------------------------- Mesh
  mesh = parallel.make_mesh(config.mesh)
  is_main = jax.process_index() == 0
  logging.info("mesh %s over %d devices, %d process(es)", dict(mesh.shape), mesh.size,
               jax.process_count())
  if is_main:
    checkpoint.dump_json(storage.join(workdir, "config.json"), config.to_dict())

  # ---------------------------------------------------------------- Data
  train_iter = data.make_iterator(config.data, "train", process_index=jax.process_index(),
                                  process_count=jax.process_count())
  sample_batch = data.example_batch(config.data, config.data.batch_size)  # global shapes

  # ---------------------------------------------------------------- Model and optimizer
  model, optimizer, schedule, abstract_state, state_shardings = build_model_and_state(
      config, mesh, sample_batch)
  num_params = sum(x.size for x in jax.tree.leaves(abstract_state.params))
  logging.info("model: %s parameters, %d layers", metrics.format_count(num_params),
               config.model.num_layers)

  # ---------------------------------------------------------------- Restore
  checkpoint.wait_for_every_process("s5scale-start")
  manager = checkpoint.make_manager(workdir, config.checkpoint)
  state, start_step = checkpoint.restore_latest(manager, abstract_state, train_iter,
                                                config.to_dict())
  if state is not None:
    logging.info("resumed from checkpoint step %d in %s", start_step, manager.directory)
  else:
    state = jax.jit(lambda: nn.unbox(steps.init_train_state(model, optimizer, config,
                                                            sample_batch)),
                    out_shardings=state_shardings)()  # created sharded, never whole on a host
    start_step = 0
    logging.info("no checkpoint in %s: starting from scratch", manager.directory)
    if config.checkpoint.init_from:
      params, from_step = checkpoint.restore_init_params(config.checkpoint.init_from,
                                                         abstract_state.params)
      state = state.replace(params=params)
      logging.info("initialised parameters from %s (step %d)", config.checkpoint.init_from,
                   from_step)

  # ---------------------------------------------------------------- Step functions
  compiled = jit_train_step(config, mesh, model, optimizer, schedule, state_shardings).lower(
      abstract_state, abstract_batch(sample_batch, mesh)).compile()
  flops_per_step = metrics.compiled_flops(compiled)
  peak_flops = metrics.peak_flops_per_device()  # the compiled HLO is one device's program
  tokens_per_step = config.data.batch_size * config.data.seq_len
  evaluator = evaluation.Evaluator(config, model, mesh) if config.eval.every_steps else None

  # ---------------------------------------------------------------- Loop
  writer = metrics.MetricsWriter(storage.join(workdir, "metrics.jsonl"),
                                 storage.join(workdir, "tb", "train"))
  progress = metrics.Progress(start_step, config.train.num_steps)
  step, last_saved, step_metrics, eval_results = start_step, start_step, None, None
  if preemption.signalled and jax.process_count() == 1:
    logging.info("preempted before training started at step %d; checkpoints left as they were",
                 step)
    checkpoint.write_run_status(workdir, "preempted", step)
    return 0
  logging.info("training from step %d to %d", step, config.train.num_steps)
  # Leaving the loop by any path, an error in an inline eval included, first finishes the save in
  # flight (Saver.__exit__).
  with writer, checkpoint.Saver(manager) as saver:
    while step < config.train.num_steps:
      if preemption.reached(step):
        save_start = time.perf_counter()
        if step != last_saved:
          saver.save(step, state, train_iter, config.to_dict(), mesh)
        saver.wait_until_finished()  # also an async save of this step started just before
        # The save's duration tells a user whether it fits a spot VM's 30 s notice.
        logging.info("preempted at step %d, checkpoint saved in %.2f s", step,
                     time.perf_counter() - save_start)
        checkpoint.write_run_status(workdir, "preempted", step)
        return 0

      step_start = time.perf_counter()
      batch = parallel.global_batch(next(train_iter), mesh)
      state, step_metrics = compiled(state, batch)
      step_metrics = jax.device_get(step_metrics)  # small; also makes step_time_s honest
      step_time = time.perf_counter() - step_start
      step += 1

      if step % config.train.log_every_steps == 0 or step == config.train.num_steps:
        rates = progress.update(step)
        scalars = dict(step_metrics, step_time_s=step_time, elapsed_s=time.time() - started,
                       tokens_per_s=tokens_per_step / step_time,
                       mfu=flops_per_step / step_time / peak_flops if flops_per_step else 0.0,
                       **{f"data/{k}": v for k, v in data.bad_data_counts().items()},
                       **{f"data/{k}": v for k, v in data.source_counts().items()})
        writer.write(step, scalars)
        logging.info("step %d/%d  loss %.4f  %.0f tokens/s  ETA %s", step,
                     config.train.num_steps, step_metrics["loss"], scalars["tokens_per_s"],
                     metrics.format_duration(rates.get("eta_s")))
      if int(step_metrics["bad_steps"]) >= config.train.max_bad_steps:
        logging.error("%d consecutive non-finite updates at step %d: stopping; the last good "
                      "checkpoint is untouched", int(step_metrics["bad_steps"]), step)
        return cli.EXIT_BAD_INPUT

      # No saves during a non-finite streak: rotation (checkpoint.keep) could drop the last good
      # one. `due` is asked at every step on every process, as its policy requires.
      due = saver.due(step) or step == config.train.num_steps
      if due and int(step_metrics["bad_steps"]) == 0:
        saver.save(step, state, train_iter, config.to_dict(), mesh)
        last_saved = step
      if evaluator and step % config.eval.every_steps == 0:
        eval_results = evaluator.run(workdir, step, state.params, state.batch_stats)

  logging.info("finished: %d steps in %s; %s; final checkpoint at step %d in %s", step,
               metrics.format_duration(time.time() - started),
               summary(step_metrics, eval_results, evaluator), last_saved, workdir)
  checkpoint.write_run_status(workdir, "finished", step)
  return 0


def summary(step_metrics: dict | None, eval_results: dict | None, evaluator) -> str:
  """The last training loss, the last eval's headline figure and the bad-data counts."""
  parts = [] if step_metrics is None else [f"loss {float(step_metrics['loss']):.4f}"]
  if eval_results:
    name = next(k for k in ("bits_per_byte", "bits_per_sample", "accuracy", "loss")
                if k in eval_results)
    parts.append(f"{evaluator.split} {name} {eval_results[name]:.4f}")
  parts += [f"{k.replace('_', ' ')} {v}" for k, v in data.bad_data_counts().items()]
  return ", ".join(parts)


def build_model_and_state(config, mesh, sample_batch: dict):
  """Model, optimizer, LR schedule, and the train state's abstract shapes and shardings.

  The state's shardings come from the parameters' logical axis names (parallel.py's rules).
  """
  model = S5Model.from_config(config.model)
  abstract_params = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), sample_batch["inputs"])["params"])
  optimizer, schedule = optim.make_optimizer(config.optim, config.train.num_steps,
                                             abstract_params)
  boxed_state = jax.eval_shape(
      lambda: steps.init_train_state(model, optimizer, config, sample_batch))
  state_shardings = parallel.logical_shardings(boxed_state, mesh)
  abstract_state = parallel.with_shardings(nn.unbox(boxed_state), state_shardings)
  return model, optimizer, schedule, abstract_state, state_shardings


def jit_train_step(config, mesh, model, optimizer, schedule, state_shardings):
  """The train step, jitted with the state donated and sharded in place."""
  train_step = steps.make_train_step(model, config.model.task, optimizer, schedule,
                                     config.optim.grad_accum_steps)
  return jax.jit(
      parallel.on_mesh(train_step, mesh),
      in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
      out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=0)


def abstract_batch(sample_batch: dict, mesh):
  sharding = parallel.batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      sample_batch)

