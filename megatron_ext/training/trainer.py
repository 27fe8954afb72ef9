"""The training loop on megatron-core: model, optimizer, schedule, eval, logs.

Why a class: the loop's state (model, optimizer, scheduler, data position,
iteration) is what a checkpoint saves and a resume restores; keeping it in
one object makes that explicit. Everything is built from a resolved
:class:`~megatron_ext.training.plan.RunPlan` (the configuration with every decision
that depends on the checkpoints on disk already made); nothing reads globals.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Optional

import torch

from megatron_ext.checkpointing import (
    CheckpointError,
    Progress,
    TrainState,
    load_checkpoint,
    save_checkpoint,
)
from megatron_ext.checkpointing.vocab import checkpoint_directory, padded_vocab_for
from megatron_ext.cli import ProgressBar, elapsed_eta
from megatron_ext.data.indexed import chat_settings_of_meta
from megatron_ext.models.builder import build_gpt_model, transformer_config
from megatron_ext.parallel import Layout, init_distributed
from megatron_ext.tokenizers import build_tokenizer, megatron_llm_specials_hint
from megatron_ext.training.config import TrainConfig
from megatron_ext.training.data import BatchBuilder, GlobalBatch, build_splits, iterations
from megatron_ext.training.metrics import MetricsWriter
from megatron_ext.training.plan import RunPlan, resolve
from megatron_ext.training.step import make_forward_step

logger = logging.getLogger(__name__)


class Trainer:
    """Trains the run a :class:`~megatron_ext.training.plan.RunPlan` describes.

    Given a plain :class:`TrainConfig` it resolves the plan first (``plan.resolve``); the
    plan is taken as it is: the trainer builds, loads and saves exactly what it says.
    """

    def __init__(self, plan: "RunPlan | TrainConfig"):
        if isinstance(plan, TrainConfig):
            plan = resolve(plan, cuda=torch.cuda.is_available())
        self.plan = plan
        self.config = config = plan.config
        self.layout: Layout = init_distributed(config.parallel.tensor_model_parallel_size,
                                               config.parallel.pipeline_model_parallel_size,
                                               config.schedule.seed,
                                               cp=config.parallel.context_parallel_size,
                                               ep=config.parallel.expert_model_parallel_size)
        if self.layout.is_logger:
            logger.info("%s", plan.summary())
        self.tokenizer = build_tokenizer(config.tokenizer.config())
        identity = self.tokenizer.identity()
        self._check_checkpoint_tokenizer()
        self.splits = build_splits(config.data, config.schedule.seed,
                                   config.model.seq_length if config.data.packed_rows else None)
        for split in self.splits.values():
            for part in split.parts if split else ():
                part.dataset.check_tokenizer(identity)
        self.train_iters = iterations(config.schedule, self.splits["train"])
        self.padded_vocab = self._vocab_rows()
        self._build_model_and_optimizer()
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        self.batches = BatchBuilder(config.model.seq_length, pad_id, config.data.scalar_loss_mask,
                                    config.data.variable_seq_lengths,
                                    config.schedule.micro_batch_size, self.layout.dp_rank,
                                    self.layout.dp, pack=config.data.pack_sequences
                                    and not config.data.packed_rows,  # per micro-batch
                                    multiple=config.parallel.sequence_multiple)
        self.window = config.model.mask_window
        self.iteration = 0
        self.consumed_samples = 0
        self.consumed_tokens = 0
        self.skipped_steps = 0  # of this launch: fp16 steps with inf/nan gradients
        s = config.schedule
        self.metrics = MetricsWriter(
            config.checkpoint.save, config.checkpoint.tensorboard_dir,
            enabled=self.layout.is_logger,
            wandb=None if s.wandb_project is None else {
                "project": s.wandb_project, "name": s.wandb_exp_name,
                "config": config.to_dict()})
        self._stop_signal: Optional[int] = None
        self._saved_at: Optional[int] = None  # iteration of the newest checkpoint on disk
        if plan.load:
            self._load()

    def _vocab_rows(self) -> int:
        """Embedding rows of the model: the tokenizer's, padded as the checkpoint was."""
        return padded_vocab_for(self.plan.load, self.tokenizer.vocab_size,
                                self.config.model.make_vocab_size_divisible_by, self.layout.tp)

    def _check_checkpoint_tokenizer(self) -> None:
        """Refuse a checkpoint made with another tokenizer: its embedding rows would mean
        other tokens (same vocabulary size or not)."""
        saved = self.plan.saved_tokenizer
        if not saved:
            return
        ours = self.tokenizer.identity()
        differences = [f"{field}: checkpoint {saved.get(field)!r} vs this run "
                       f"{ours.get(field)!r}" for field in ("sha256", "vocab_size", "special_tokens")
                       if saved.get(field) != ours.get(field)]
        if differences:
            shown = "; ".join(d if len(d) < 160 else d[:160] + "..." for d in differences)
            raise CheckpointError(
                f"{checkpoint_directory(self.plan.load)} was made with another tokenizer "
                f"({shown}); pass the checkpoint's tokenizer (--vocab_file, "
                "--vocab_extra_ids_list in the same order)"
                + megatron_llm_specials_hint(saved, ours))

    def _chat_settings(self) -> dict:
        """The training data's chat format (from its meta.json), saved with every checkpoint
        so export and generation use it wherever they run."""
        for split in self.splits.values():
            for part in split.parts if split else ():
                name, template = chat_settings_of_meta(part.dataset.meta)
                if name:
                    return {"format": name, "prompt_template": template}
        return {"format": None, "prompt_template": None}

    def _train_state(self, parts: Optional[str] = None):
        if parts is None:
            parts = self.plan.parts
        return TrainState(self.model.module, self.layout, self.optimizer, self.scheduler, parts)

    def _weights_loaded(self) -> None:
        """The model's weights changed outside the optimizer: mixed-precision optimizers keep
        fp32 copies of them, made when they were built, which must follow."""
        reload = getattr(self.optimizer, "reload_model_params", None)
        if reload is not None:
            reload()

    def _restore_progress(self, progress: Progress) -> None:
        self.iteration = progress.iteration
        self.consumed_samples = progress.consumed_samples
        self.consumed_tokens = progress.consumed_tokens
        if self.plan.continues_logs:
            self.metrics.truncate_after(self.iteration)
            self._saved_at = self.iteration

    def _load(self) -> None:
        """What the plan loads: a full checkpoint (resume), or weights only (finetune, the
        base of adapters, then the adapter checkpoint being resumed)."""
        from megatron_ext.peft.adapters import init_magnitudes

        plan = self.plan
        parts = "base" if plan.peft is not None else "all"
        loaded = load_checkpoint(plan.load, self._train_state(parts),
                                 weights_only=plan.weights_only,
                                 allow_missing=plan.allow_missing)
        if loaded is None:
            return
        iteration, progress = loaded
        if plan.peft is not None:
            # adapters fresh: A drawn, B zero, DoRA's magnitude the base rows' norms
            init_magnitudes(self.model.module)
        if plan.weights_only:
            self._weights_loaded()
        else:
            self._restore_progress(progress)
        if self.layout.is_logger:
            if plan.peft is not None:
                logger.info("loaded base weights from %s", plan.load)
            else:
                logger.info("loaded %s from %s (iteration %d)%s",
                            "weights" if plan.weights_only else "checkpoint", plan.load,
                            iteration, "" if plan.weights_only
                            else f"; resuming at iteration {self.iteration}")
        if plan.peft is None or plan.peft.resume is None:
            return
        iteration, progress = load_checkpoint(plan.peft.resume, self._train_state("adapters"),
                                              weights_only=False)
        self._restore_progress(progress)
        if self.layout.is_logger:
            logger.info("resumed the adapters from %s (iteration %d)", plan.peft.resume,
                        iteration)

    # ------------------------------------------------------------------ setup
    def _build_model_and_optimizer(self) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        c, layout = self.config, self.layout
        self.model_config = transformer_config(
            c.model, c.parallel, c.precision,
            # shapes then travel with the activations between pipeline stages
            variable_seq_lengths=(c.data.variable_seq_lengths or c.data.pack_sequences)
            and layout.pp > 1,
            use_cpu_initialization=True,
            moe=c.moe,
        )
        model = build_gpt_model(c.model, self.model_config, self.padded_vocab,
                                pre_process=layout.first_stage, post_process=layout.last_stage,
                                init_seed=c.schedule.seed,
                                use_flash_attn=c.precision.use_flash_attn)
        self.peft_report = None
        if self.plan.peft is not None:  # before DDP and the optimizer: they skip frozen weights
            from megatron_ext.peft.adapters import add_adapters

            self.peft_report = add_adapters(model, c.peft, self.plan.peft.targets,
                                            c.schedule.seed)
        model.to(layout.device)
        p = c.parallel
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=p.overlap_grad_reduce,
            overlap_param_gather=p.overlap_param_gather,
            use_distributed_optimizer=p.use_distributed_optimizer,
        )
        self.model = DistributedDataParallel(self.model_config, ddp_config, model)
        self.model_config.finalize_model_grads_func = finalize_model_grads
        if p.overlap_grad_reduce:  # as Megatron-LM: no reduction before the last micro-batch
            self.model_config.no_sync_func = self.model.no_sync
            self.model_config.grad_sync_func = self.model.start_grad_sync
        o = c.optim
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=o.lr,
                min_lr=o.min_lr,
                weight_decay=o.weight_decay,
                adam_beta1=o.adam_beta1,
                adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps,
                clip_grad=o.clip_grad,
                bf16=c.precision.bf16,
                fp16=c.precision.fp16,
                params_dtype=self.model_config.params_dtype,
                loss_scale=o.loss_scale,
                initial_loss_scale=o.initial_loss_scale,
                min_loss_scale=o.min_loss_scale,
                loss_scale_window=o.loss_scale_window,
                hysteresis=o.hysteresis,
                use_distributed_optimizer=p.use_distributed_optimizer,
            ),
            [self.model],
        )
        if c.precision.fp16:
            self.model_config.grad_scale_func = self.optimizer.scale_loss
        self.scheduler = self._scheduler()

    def _scheduler(self):
        """megatron-core's learning-rate and weight-decay schedule of ``self.optimizer``
        (anything with torch's ``param_groups``), in samples."""
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        o = self.config.optim
        gbs = self.config.schedule.global_batch_size
        decay_iters = o.lr_decay_iters or self.train_iters
        return OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if o.lr_warmup_iters else o.lr,
            max_lr=o.lr,
            min_lr=o.min_lr,
            lr_warmup_steps=o.lr_warmup_iters * gbs,
            lr_decay_steps=max(decay_iters, o.lr_warmup_iters + 1) * gbs,
            lr_decay_style=o.lr_decay_style,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=max(1, self.train_iters * gbs),
            wd_incr_style="constant",
        )

    # ------------------------------------------------------------------ steps
    def _run(self, gb: GlobalBatch, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        widths = [int(mb.tokens.shape[1]) for mb in gb.micro_batches]
        return get_forward_backward_func()(
            forward_step_func=make_forward_step(gb.total_weight, self.window, self.layout.device,
                                                self.layout.cp, self.layout.cp_rank,
                                                moe=bool(self.config.model.experts)),
            data_iterator=iter(gb.micro_batches),
            model=[self.model],
            num_microbatches=len(gb.micro_batches),
            seq_length=max(widths),
            micro_batch_size=self.config.schedule.micro_batch_size,
            forward_only=forward_only,
        )

    def _reduce(self, reports) -> tuple[float, float]:
        """(sum of w * ce, sum of w) over the global batch, known on every rank: each
        data- and context-parallel rank holds its samples' and positions' share."""
        import torch.distributed as dist
        from megatron.core import parallel_state

        total = torch.zeros(2, dtype=torch.float64, device=self.layout.device)
        if self.layout.last_stage:
            for report in reports:
                total += report["lm loss"].to(torch.float64)
            dist.all_reduce(total, group=parallel_state.get_data_parallel_group(
                with_context_parallel=True))
        if self.layout.pp > 1:
            dist.broadcast(total, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return float(total[0]), float(total[1])

    def train_step(self) -> dict:
        start = time.perf_counter()
        s = self.config.schedule
        gb = self.batches.global_batch(self.splits["train"], self.consumed_samples,
                                       s.global_batch_size)
        data_time = time.perf_counter() - start
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.config.model.experts:  # the aux losses' share of each micro-batch
            from megatron_ext.models.moe import set_aux_loss_scale

            set_aux_loss_scale(len(gb.micro_batches) * self.layout.dp)
        reports = self._run(gb, forward_only=False)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:  # an fp16 overflow skips the step: the schedule must not advance
            self.scheduler.step(increment=s.global_batch_size)
        else:
            self.skipped_steps += 1
        weighted, weight = self._reduce(reports)
        aux = self._aux_losses()
        self.iteration += 1
        self.consumed_samples += s.global_batch_size
        self.consumed_tokens += gb.real_tokens
        elapsed = time.perf_counter() - start
        return {
            "loss": weighted / weight if weight > 0 else 0.0,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": lr,
            "skipped": not update_ok,
            "loss_scale": float(self.optimizer.get_loss_scale()),
            "iter_time": elapsed,
            "data_time": data_time,
            "tokens": gb.padded_tokens,
            "real_tokens": gb.real_tokens,
            "rows": gb.rows,
            "records": gb.records,
            **aux,
        }

    def _aux_losses(self) -> dict:
        """A mixture of experts' auxiliary losses of the step (``models/moe.py``): what each
        added to the objective, by name (``load_balancing_loss``, ``z_loss``)."""
        if not self.config.model.experts:
            return {}
        from megatron.core import parallel_state

        from megatron_ext.models.moe import aux_losses

        return aux_losses(self.model_config,
                          parallel_state.get_data_parallel_group(with_context_parallel=True),
                          parallel_state.get_pipeline_model_parallel_group(),
                          parallel_state.get_tensor_model_parallel_group())

    def _gather_params(self) -> None:
        """The weights of the last update on every rank, now.

        With ``--overlap_param_gather`` the distributed optimizer's all-gather of the
        updated weights waits for the next training forward pass (megatron-core's forward
        pre-hooks); an evaluation or a checkpoint needs them before that. As Megatron-LM
        does around both: the hooks off (which gathers), then on again."""
        if self.config.parallel.overlap_param_gather:
            self.model.disable_forward_pre_hook()
            self.model.enable_forward_pre_hook()

    def evaluate(self, split_name: str = "valid") -> Optional[dict]:
        split = self.splits.get(split_name)
        if split is None:
            return None
        self._gather_params()
        gbs = self.config.schedule.global_batch_size
        batches = min(self.config.schedule.eval_iters, max(1, len(split) // gbs))
        self.model.eval()
        weighted = weight = 0.0
        with torch.no_grad():
            for index in range(batches):
                gb = self.batches.global_batch(split, index * gbs, gbs)
                w, n = self._reduce(self._run(gb, forward_only=True))
                weighted, weight = weighted + w, weight + n
        self.model.train()
        loss = weighted / weight if weight > 0 else float("nan")
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "batches": batches}

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        s = self.config.schedule
        self._install_signal_handlers()
        self._log_startup()
        interval_start = time.perf_counter()
        start_iteration = self.iteration
        last: dict = {}
        started = time.monotonic()
        self._clock = (started, start_iteration)  # this launch's: the log lines' ETA
        stopped = False
        evaluated_at = None
        window: list[float] = []
        if self.iteration >= self.train_iters and self.layout.is_logger:
            logger.info("the checkpoint is already at iteration %d of %d: nothing to train",
                        self.iteration, self.train_iters)
        # a bar on a terminal (the log lines print above it); in a log file the lines only
        bar = ProgressBar(total=self.train_iters, initial=self.iteration, desc="training",
                          unit="step", enabled=self.layout.is_logger, every=None, log=logger)
        with bar, _lines_above(bar):
            while self.iteration < self.train_iters:
                last = self.train_step()
                bar.update(1)
                window.append(last["loss"])
                if (self.iteration % max(1, s.log_interval) == 0
                        or self.iteration == self.train_iters):
                    last["loss_avg"] = sum(window) / len(window)
                    window.clear()
                    self._log(last)
                if s.eval_interval and self.iteration % s.eval_interval == 0:
                    self._log_eval(self.evaluate())
                    evaluated_at = self.iteration
                stopped = self._should_stop(started)
                if self.config.checkpoint.save and (
                        stopped or (s.save_interval and self.iteration % s.save_interval == 0)):
                    self.save()
                if stopped:
                    break
        final_eval = None
        # the final evaluation once the run trained to its end now (a finished run
        # relaunched trains nothing and evaluates nothing), even when the loop's periodic
        # save already wrote the last iteration
        if not stopped and self.iteration > start_iteration:
            if evaluated_at != self.iteration:
                final_eval = self.evaluate()
                self._log_eval(final_eval)
            self._log_eval(self.evaluate("test"), "test")
        if not stopped and self.config.checkpoint.save and self._saved_at != self.iteration:
            self.save()
        self.metrics.close()
        if self.skipped_steps and self.layout.is_logger:
            logger.info("%d of %d steps skipped (inf/nan gradients); loss scale now %g",
                        self.skipped_steps, self.iteration - start_iteration,
                        float(self.optimizer.get_loss_scale()))
        return {"iteration": self.iteration, "last": last, "valid": final_eval,
                "stopped_early": stopped, "skipped_steps": self.skipped_steps,
                "seconds": time.perf_counter() - interval_start}

    def save(self) -> str:
        start = time.perf_counter()
        self._gather_params()
        progress = Progress(self.iteration, self.consumed_samples, self.consumed_tokens)
        run_config = {**self.config.to_dict(), "tokenizer_identity": self.tokenizer.identity(),
                      "chat": self._chat_settings()}
        if self.plan.peft is not None:  # adapters only: the base they belong to
            run_config["peft"] = self.config.peft.settings(self.plan.peft.targets)
            run_config["base"] = self.plan.peft.record
            run_config["checkpoint"]["load"] = self.plan.peft.record["load"]
        # whether the output layer is tied is recorded as decided, not as "the family's
        # default", so a checkpoint says which tensors it holds whatever reads it
        run_config["model"]["tie_embeddings"] = self.config.model.resolved().tie_embeddings
        path = save_checkpoint(self.config.checkpoint.save, self._train_state(), progress,
                               run_config)
        self._saved_at = self.iteration
        if self.layout.is_logger:
            logger.info("saved checkpoint %s (%.1f s)", path, time.perf_counter() - start)
        return path

    def _should_stop(self, started: float) -> bool:
        """Stop after this iteration? Every rank must answer the same, so the
        signal and clock flags are max-reduced (a signal may reach ranks at
        different iterations)."""
        import torch.distributed as dist

        s = self.config.schedule
        if s.exit_interval and self.iteration % s.exit_interval == 0:
            return True
        local = self._stop_signal is not None or (
            s.exit_duration_in_mins is not None
            and (time.monotonic() - started) / 60 > s.exit_duration_in_mins)
        flag = torch.tensor(int(local), device=self.layout.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.layout.is_logger:
            reason = (f"signal {self._stop_signal}" if self._stop_signal is not None
                      else "--exit_duration_in_mins" if local else "another rank's signal")
            logger.info("stopping after iteration %d (%s)", self.iteration, reason)
        return bool(flag.item())

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self._stop_signal = signum

        signal.signal(signal.SIGTERM, handler)

    def _log_startup(self) -> None:
        if not self.layout.is_logger:
            return
        c, layout = self.config, self.layout
        sizes = {name: (len(split) if split else 0) for name, split in self.splits.items()}
        logger.info("%s", self._model_line())
        logger.info("parallel: world %d = TP %d x PP %d x CP %d x DP %d on %s",
                    layout.world_size, layout.tp, layout.pp, layout.cp, layout.dp, layout.device)
        if layout.cp > 1 and c.precision.use_flash_attn:
            logger.info("--use_flash_attn: not under context parallelism; attention runs on "
                        "PyTorch SDPA")
        if self.peft_report is not None:
            logger.info("%s: %s", c.peft.peft, self.peft_report.line())
        if c.data.packed_rows:
            records = {name: (split.records_per_epoch if split else 0)
                       for name, split in self.splits.items()}
            logger.info("data: train %d / valid %d / test %d records packed into %d / %d / %d "
                        "rows of %d positions (padding %.1f%% in the first epoch); a sample is "
                        "a packed row", records["train"], records["valid"], records["test"],
                        sizes["train"], sizes["valid"], sizes["test"], c.model.seq_length,
                        100 * self.splits["train"].padding(0))
        else:
            logger.info("data: train %d / valid %d / test %d records", sizes["train"],
                        sizes["valid"], sizes["test"])
        logger.info("%d iterations of %d samples (micro batch %d)", self.train_iters,
                    c.schedule.global_batch_size, c.schedule.micro_batch_size)

    def _model_line(self) -> str:
        c = self.config
        params = sum(p.numel() for p in self.model.parameters())
        return ("model %s: %d layers, hidden %d, heads %d/%d kv, vocab %d (padded %d); "
                "%.2fM parameters on this rank" % (
                    c.model.model_name, c.model.num_layers, c.model.hidden_size,
                    c.model.num_attention_heads, c.model.resolved().num_attention_heads_kv,
                    self.tokenizer.vocab_size, self.padded_vocab, params / 1e6))

    def _log(self, step: dict) -> None:
        if not self.layout.is_logger:
            return
        seconds = max(step["iter_time"], 1e-9)
        values = {
            "consumed_samples": self.consumed_samples,
            "consumed_tokens": self.consumed_tokens,
            "lr": step["lr"],
            "loss": step["loss"],
            "loss_avg": step["loss_avg"],
            "grad_norm": step["grad_norm"],
            "iter_time": step["iter_time"],
            "tokens_per_sec": step["tokens"] / seconds,
            "real_tokens_per_sec": step["real_tokens"] / seconds,
            "padding_fraction": 1.0 - step["real_tokens"] / max(1, step["tokens"]),
            "rows": step["rows"],
            "records": step["records"],
            "data_wait_fraction": step["data_time"] / seconds,
            "memory_mb": _memory_mb(self.layout.device),
        }
        if self.config.precision.fp16:  # the loss scale: dynamic, or --loss_scale
            values["loss_scale"] = step["loss_scale"]
            values["skipped"] = int(step["skipped"])
            values["skipped_steps"] = self.skipped_steps
        for name in ("load_balancing_loss", "z_loss"):  # a mixture of experts' aux losses
            if name in step:
                values[name] = step[name]
        self.metrics.write(self.iteration, values)
        started, first = self._clock
        logger.info("%s", train_log_line(self.iteration, self.train_iters, values,
                                         time.monotonic() - started, first))

    def _log_eval(self, result: Optional[dict], split: str = "valid") -> None:
        if result is None or not self.layout.is_logger:
            return
        self.metrics.write(self.iteration, {"loss": result["loss"], "ppl": result["ppl"]},
                           prefix=split)
        logger.info("%s at iter %d | loss %.5f | ppl %.3f",
                    "validation" if split == "valid" else split, self.iteration,
                    result["loss"], result["ppl"])


def _lines_above(bar: ProgressBar):
    """Log lines printed above ``bar`` on a terminal (tqdm's redirection of the logging
    handlers); nothing changes elsewhere."""
    import contextlib

    if not bar.terminal:
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm()


def train_log_line(iteration: int, train_iters: int, values: dict, elapsed: float,
                   first_iteration: int) -> str:
    """A training log line; its elapsed time and ETA are those of this launch (which started
    at ``first_iteration``: a resumed run's ETA is not skewed by the steps it did not do).
    With fp16 (``loss_scale`` in ``values``) it shows the loss scale, and says so when the
    step was skipped; with packing, the step's rows and records."""
    scale = ""
    if "loss_scale" in values:
        scale = " | loss scale %g" % values["loss_scale"]
        if values.get("skipped"):
            scale += " | step skipped (inf/nan gradients; %d so far)" % values["skipped_steps"]
    step = (f"{values['rows']} rows, {values['records']} records | "
            if "records" in values else "")
    for name in ("load_balancing_loss", "z_loss"):  # a mixture of experts' aux losses
        if name in values:
            scale += " | %s %.5f" % (name.replace("_", " "), values[name])
    return (
        "iter %d/%d | samples %d | tokens %d | lr %.3g | loss %.5f (avg of interval) | "
        "grad norm %.3f%s | %.2f s/iter | %.0f tok/s (%.0f real) | pad %.1f%% | %smem %.0f MB | %s"
        % (iteration, train_iters, values["consumed_samples"], values["consumed_tokens"],
           values["lr"], values["loss_avg"], values["grad_norm"], scale, values["iter_time"],
           values["tokens_per_sec"], values["real_tokens_per_sec"],
           100 * values["padding_fraction"], step, values["memory_mb"],
           elapsed_eta(elapsed, iteration - first_iteration, train_iters - first_iteration)))


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 2**20
    except ImportError:
        return float("nan")
