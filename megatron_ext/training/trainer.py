"""The training loop on megatron-core: model, optimizer, schedule, eval, logs.

Why a class: the loop's state (model, optimizer, scheduler, data position,
iteration) is what a checkpoint saves and a resume restores; keeping it in
one object makes that explicit. Everything is built from a
:class:`~megatron_ext.training.config.TrainConfig`; nothing reads globals.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import time
from typing import Optional

import torch

from megatron_ext.checkpointing import (
    CheckpointError,
    Progress,
    TrainState,
    latest_iteration,
    load_checkpoint,
    load_run_config,
    read_run_config,
    save_checkpoint,
)
from megatron_ext.checkpointing.adapters import adapter_run_config, base_of, base_record, check_base
from megatron_ext.checkpointing.import_cache import (
    ImportOptions,
    default_cache_dir,
    ensure_imported,
)
from megatron_ext.checkpointing.run_config import tokenizer_config_from_run
from megatron_ext.checkpointing.vocab import checkpoint_directory, padded_vocab_for
from megatron_ext.data.indexed import chat_settings_of_meta
from megatron_ext.models.builder import build_gpt_model, transformer_config
from megatron_ext.models.config import ModelArgs
from megatron_ext.models.families import get_family
from megatron_ext.parallel import Layout, init_distributed
from megatron_ext.peft.config import PeftArgs, resolve_targets
from megatron_ext.tokenizers import build_tokenizer, megatron_llm_specials_hint
from megatron_ext.training.config import TrainConfig
from megatron_ext.training.data import BatchBuilder, GlobalBatch, build_splits, iterations
from megatron_ext.training.metrics import MetricsWriter
from megatron_ext.training.step import make_forward_step

logger = logging.getLogger(__name__)


class Trainer:
    def __init__(self, config: TrainConfig):
        self.peft_plan: Optional[PeftPlan] = None
        if config.peft.enabled or adapter_run_config(config.checkpoint.load or "") is not None:
            config, self.peft_plan = _plan_peft(config)
        elif config.checkpoint.imports_model:
            config = _with_imported_model(config)
        if self.peft_plan is None:
            config = _with_auto_resume(config)
        if config.checkpoint.use_checkpoint_args and config.checkpoint.load:
            config = _with_checkpoint_model_args(config)
        self.config = config
        # before any process group; with the device checks finetune.py could not run
        config.validate(int(os.environ.get("WORLD_SIZE", "1")), cuda=torch.cuda.is_available())
        self.layout: Layout = init_distributed(config.parallel.tensor_model_parallel_size,
                                               config.parallel.pipeline_model_parallel_size,
                                               config.schedule.seed,
                                               cp=config.parallel.context_parallel_size)
        self.tokenizer = build_tokenizer(config.tokenizer.config())
        identity = self.tokenizer.identity()
        self.splits = build_splits(config.data, config.schedule.seed)
        for split in self.splits.values():
            for part in split.parts if split else ():
                part.dataset.check_tokenizer(identity)
        self.train_iters = iterations(config.schedule, self.splits["train"])
        self.padded_vocab = self._padded_vocab()
        self._build_model_and_optimizer()
        pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        self.batches = BatchBuilder(config.model.seq_length, pad_id, config.data.scalar_loss_mask,
                                    config.data.variable_seq_lengths,
                                    config.schedule.micro_batch_size, self.layout.dp_rank,
                                    self.layout.dp, pack=config.data.pack_sequences,
                                    multiple=config.parallel.sequence_multiple)
        self.window = config.model.mask_window
        self.iteration = 0
        self.consumed_samples = 0
        self.consumed_tokens = 0
        s = config.schedule
        self.metrics = MetricsWriter(
            config.checkpoint.save, config.checkpoint.tensorboard_dir,
            enabled=self.layout.is_logger,
            wandb=None if s.wandb_project is None else {
                "project": s.wandb_project, "name": s.wandb_exp_name,
                "config": config.to_dict()})
        self._stop_signal: Optional[int] = None
        self._saved_at: Optional[int] = None  # iteration of the newest checkpoint on disk
        if config.checkpoint.load:
            self._load()

    def _padded_vocab(self) -> int:
        """Embedding rows: the checkpoint's when it has a usable count, else padded for TP
        (``checkpointing.vocab``); a checkpoint made with another tokenizer is refused."""
        c = self.config
        directory = checkpoint_directory(c.checkpoint.load)
        if directory is not None:
            self._check_checkpoint_tokenizer(directory)
        return padded_vocab_for(c.checkpoint.load, self.tokenizer.vocab_size,
                                c.model.make_vocab_size_divisible_by, self.layout.tp)

    def _check_checkpoint_tokenizer(self, directory: str) -> None:
        """Refuse a checkpoint made with another tokenizer: its embedding rows would mean
        other tokens (same vocabulary size or not)."""
        try:
            saved = (load_run_config(directory, missing_ok=True) or {}).get("tokenizer_identity")
        except CheckpointError:
            return  # checked later with a full message if the checkpoint is unreadable
        if not saved:
            return
        ours = self.tokenizer.identity()
        differences = [f"{field}: checkpoint {saved.get(field)!r} vs this run "
                       f"{ours.get(field)!r}" for field in ("sha256", "vocab_size", "special_tokens")
                       if saved.get(field) != ours.get(field)]
        if differences:
            shown = "; ".join(d if len(d) < 160 else d[:160] + "..." for d in differences)
            raise CheckpointError(
                f"{directory} was made with another tokenizer ({shown}); pass the checkpoint's "
                "tokenizer (--vocab_file, --vocab_extra_ids_list in the same order)"
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
            parts = "adapters" if self.peft_plan else "all"
        return TrainState(self.model.module, self.layout, self.optimizer, self.scheduler, parts)

    def _weights_loaded(self) -> None:
        """The model's weights changed outside the optimizer: mixed-precision optimizers keep
        fp32 copies of them, made when they were built, which must follow."""
        reload = getattr(self.optimizer, "reload_model_params", None)
        if reload is not None:
            reload()

    def _load(self) -> None:
        if self.peft_plan is not None:
            return self._load_peft()
        c = self.config.checkpoint
        own_dir = os.path.abspath(c.load) == os.path.abspath(c.save or "")
        loaded = load_checkpoint(c.load, self._train_state(), weights_only=c.finetune,
                                 allow_missing=own_dir and not c.finetune)
        if loaded is None:
            return
        iteration, progress = loaded
        if c.finetune:
            self._weights_loaded()
        self.iteration = progress.iteration
        self.consumed_samples = progress.consumed_samples
        self.consumed_tokens = progress.consumed_tokens
        if not c.finetune:
            self.metrics.truncate_after(self.iteration)
            self._saved_at = self.iteration
        if self.layout.is_logger:
            logger.info("loaded %s from %s (iteration %d)%s",
                        "weights" if c.finetune else "checkpoint", c.load, iteration,
                        "" if c.finetune else f"; resuming at iteration {self.iteration}")

    def _load_peft(self) -> None:
        """The base weights (adapters fresh: A drawn, B zero, DoRA's magnitude the base rows'
        norms), then, when resuming, the adapter checkpoint: adapters, optimizer, schedule,
        data position."""
        from megatron_ext.peft.adapters import init_magnitudes

        plan = self.peft_plan
        load_checkpoint(plan.base_checkpoint, self._train_state("base"), weights_only=True)
        init_magnitudes(self.model.module)
        self._weights_loaded()
        if self.layout.is_logger:
            logger.info("loaded base weights from %s", plan.base_checkpoint)
        if plan.resume is None:
            return
        iteration, progress = load_checkpoint(plan.resume, self._train_state("adapters"),
                                              weights_only=False)
        self.iteration = progress.iteration
        self.consumed_samples = progress.consumed_samples
        self.consumed_tokens = progress.consumed_tokens
        if os.path.abspath(plan.resume) == os.path.abspath(self.config.checkpoint.save or ""):
            self.metrics.truncate_after(self.iteration)
            self._saved_at = self.iteration
        if self.layout.is_logger:
            logger.info("resumed the adapters from %s (iteration %d)", plan.resume, iteration)

    # ------------------------------------------------------------------ setup
    def _build_model_and_optimizer(self) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        c, layout = self.config, self.layout
        self.model_config = transformer_config(
            c.model, c.parallel, c.precision,
            # shapes then travel with the activations between pipeline stages
            variable_seq_lengths=(c.data.variable_seq_lengths or c.data.pack_sequences)
            and layout.pp > 1,
            use_cpu_initialization=True,
        )
        model = build_gpt_model(c.model, self.model_config, self.padded_vocab,
                                pre_process=layout.first_stage, post_process=layout.last_stage,
                                init_seed=c.schedule.seed,
                                use_flash_attn=c.precision.use_flash_attn)
        self.peft_report = None
        if self.peft_plan is not None:  # before DDP and the optimizer: they skip frozen weights
            from megatron_ext.peft.adapters import add_adapters

            self.peft_report = add_adapters(model, c.peft, self.peft_plan.targets,
                                            c.schedule.seed)
        model.to(layout.device)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=c.parallel.use_distributed_optimizer,
        )
        self.model = DistributedDataParallel(self.model_config, ddp_config, model)
        self.model_config.finalize_model_grads_func = finalize_model_grads
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
                use_distributed_optimizer=c.parallel.use_distributed_optimizer,
            ),
            [self.model],
        )
        if c.precision.fp16:
            self.model_config.grad_scale_func = self.optimizer.scale_loss
        gbs = c.schedule.global_batch_size
        decay_iters = o.lr_decay_iters or self.train_iters
        self.scheduler = OptimizerParamScheduler(
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
                                                self.layout.cp, self.layout.cp_rank),
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
        reports = self._run(gb, forward_only=False)
        lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:  # an fp16 overflow skips the step: the schedule must not advance
            self.scheduler.step(increment=s.global_batch_size)
        weighted, weight = self._reduce(reports)
        self.iteration += 1
        self.consumed_samples += s.global_batch_size
        self.consumed_tokens += gb.real_tokens
        elapsed = time.perf_counter() - start
        return {
            "loss": weighted / weight if weight > 0 else 0.0,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": lr,
            "skipped": not update_ok,
            "iter_time": elapsed,
            "data_time": data_time,
            "tokens": gb.padded_tokens,
            "real_tokens": gb.real_tokens,
        }

    def evaluate(self, split_name: str = "valid") -> Optional[dict]:
        split = self.splits.get(split_name)
        if split is None:
            return None
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
        stopped = False
        evaluated_at = None
        window: list[float] = []
        if self.iteration >= self.train_iters and self.layout.is_logger:
            logger.info("the checkpoint is already at iteration %d of %d: nothing to train",
                        self.iteration, self.train_iters)
        while self.iteration < self.train_iters:
            last = self.train_step()
            window.append(last["loss"])
            if self.iteration % max(1, s.log_interval) == 0 or self.iteration == self.train_iters:
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
        return {"iteration": self.iteration, "last": last, "valid": final_eval,
                "stopped_early": stopped, "seconds": time.perf_counter() - interval_start}

    def save(self) -> str:
        start = time.perf_counter()
        progress = Progress(self.iteration, self.consumed_samples, self.consumed_tokens)
        run_config = {**self.config.to_dict(), "tokenizer_identity": self.tokenizer.identity(),
                      "chat": self._chat_settings()}
        if self.peft_plan is not None:  # adapters only: the base they belong to
            run_config["peft"] = self.config.peft.settings(self.peft_plan.targets)
            run_config["base"] = self.peft_plan.record
            run_config["checkpoint"]["load"] = self.peft_plan.record["load"]
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
        if self.config.checkpoint.save:
            from megatron_ext.checkpointing.dist import start_checkpoint_writer

            start_checkpoint_writer()  # before SIGTERM means "save": it must survive it

        def handler(signum, frame):
            self._stop_signal = signum

        signal.signal(signal.SIGTERM, handler)

    def _log_startup(self) -> None:
        if not self.layout.is_logger:
            return
        c, layout = self.config, self.layout
        params = sum(p.numel() for p in self.model.parameters())
        sizes = {name: (len(split) if split else 0) for name, split in self.splits.items()}
        logger.info(
            "model %s: %d layers, hidden %d, heads %d/%d kv, vocab %d (padded %d); "
            "%.2fM parameters on this rank", c.model.model_name, c.model.num_layers,
            c.model.hidden_size, c.model.num_attention_heads,
            c.model.resolved().num_attention_heads_kv,
            self.tokenizer.vocab_size, self.padded_vocab, params / 1e6)
        logger.info("parallel: world %d = TP %d x PP %d x CP %d x DP %d on %s",
                    layout.world_size, layout.tp, layout.pp, layout.cp, layout.dp, layout.device)
        if layout.cp > 1 and c.precision.use_flash_attn:
            logger.info("--use_flash_attn: not under context parallelism; attention runs on "
                        "PyTorch SDPA")
        if self.peft_report is not None:
            logger.info("%s: %s", c.peft.peft, self.peft_report.line())
        logger.info("data: train %d / valid %d / test %d records; %d iterations of %d samples "
                    "(micro batch %d)", sizes["train"], sizes["valid"], sizes["test"],
                    self.train_iters, c.schedule.global_batch_size, c.schedule.micro_batch_size)

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
            "data_wait_fraction": step["data_time"] / seconds,
            "memory_mb": _memory_mb(self.layout.device),
        }
        self.metrics.write(self.iteration, values)
        logger.info(
            "iter %d/%d | samples %d | tokens %d | lr %.3g | loss %.5f (avg of interval) | "
            "grad norm %.3f | "
            "%.2f s/iter | %.0f tok/s (%.0f real) | pad %.1f%% | mem %.0f MB",
            self.iteration, self.train_iters, self.consumed_samples, self.consumed_tokens,
            values["lr"], values["loss_avg"], values["grad_norm"], values["iter_time"],
            values["tokens_per_sec"], values["real_tokens_per_sec"],
            100 * values["padding_fraction"], values["memory_mb"])

    def _log_eval(self, result: Optional[dict], split: str = "valid") -> None:
        if result is None or not self.layout.is_logger:
            return
        self.metrics.write(self.iteration, {"loss": result["loss"], "ppl": result["ppl"]},
                           prefix=split)
        logger.info("%s at iter %d | loss %.5f | ppl %.3f",
                    "validation" if split == "valid" else split, self.iteration,
                    result["loss"], result["ppl"])


@dataclasses.dataclass(frozen=True)
class PeftPlan:
    """Where a LoRA/DoRA run's weights come from."""

    base_checkpoint: str  # the base weights (a checkpoint; an import for a Hugging Face model)
    resume: Optional[str]  # the adapter checkpoint to resume from, None for fresh adapters
    targets: tuple[str, ...]  # the adapted linear layers (megatron-core short names)
    record: dict  # the base as adapter checkpoints record it (path, identity)


def _plan_peft(config: TrainConfig) -> tuple[TrainConfig, PeftPlan]:
    """The base, the resume point and the adapter settings of a LoRA/DoRA run.

    ``--load`` is the base model (any checkpoint form, a Hugging Face directory or a
    GGUF file) and the run resumes from the adapter checkpoint in ``--save`` when there
    is one (the same command restarts a stopped run); ``--load`` may also name an
    adapter checkpoint, whose recorded base is then used. Either way the base must be
    the one the adapters were trained on, and the adapter settings the same.
    """
    c = config.checkpoint
    saved = adapter_run_config(c.load)
    resume = c.load if saved is not None else None
    if saved is not None:  # --load ADAPTERS: the recorded base
        base_load = saved["base"]["load"]
        base_checkpoint = base_of(saved, c.load)
        config = _with_saved_peft(config, saved, c.load)
        if not config.tokenizer.vocab_file:
            config = dataclasses.replace(config, tokenizer=_own_tokenizer(
                config.tokenizer, tokenizer_config_from_run(base_checkpoint, saved)))
        config = dataclasses.replace(config, checkpoint=dataclasses.replace(
            c, load=base_checkpoint, finetune=True, use_checkpoint_args=True))
    else:
        base_load = c.load
        if c.imports_model:
            config = _with_imported_model(config)
        config = dataclasses.replace(config, checkpoint=dataclasses.replace(
            config.checkpoint, finetune=True, use_checkpoint_args=True))
        base_checkpoint = config.checkpoint.load
        previous = adapter_run_config(c.save) if c.save else None
        if previous is not None:  # the same command again: resume
            check_base(previous["base"], base_checkpoint, c.save)
            config = _with_saved_peft(config, previous, c.save)
            resume = c.save
    targets = resolve_targets(config.peft.target_names(),
                              _hf_names(read_run_config(base_checkpoint)))
    record = base_record(base_load, base_checkpoint)
    return config, PeftPlan(base_checkpoint, resume, targets, record)


def _with_saved_peft(config: TrainConfig, saved: dict, where: str) -> TrainConfig:
    """The adapter settings of the checkpoint in ``where``; the command's must agree."""
    settings = saved["peft"]
    mine = config.peft
    if mine.enabled:
        ours = mine.settings(resolve_targets(mine.target_names(), _hf_names(saved)))
        differ = [f"{key}: checkpoint {settings.get(key)!r}, this run {value!r}"
                  for key, value in ours.items() if settings.get(key) != value]
        if differ:
            raise CheckpointError(f"{where} holds adapters with other settings ("
                                  + "; ".join(differ) + "); use the same --peft flags, or "
                                  "another --save for new adapters")
    return dataclasses.replace(config, peft=PeftArgs.from_settings(settings))


def _hf_names(run_config: dict):
    family = get_family((run_config.get("model") or {}).get("model_name") or "llama2")
    return family.hf.linear_names if family.hf is not None else None


def _own_tokenizer(tokenizer, own):
    """``tokenizer`` (the flags) with the file, type and id layout of a checkpoint's own
    tokenizer ``own`` (a TokenizerConfig); the flags' extra tokens are kept."""
    return dataclasses.replace(tokenizer, tokenizer_type=own.tokenizer_type,
                               vocab_file=own.vocab_file,
                               megatron_llm_specials=own.megatron_llm_specials)


def _with_imported_model(config: TrainConfig) -> TrainConfig:
    """``--load`` of a Hugging Face model or GGUF file: its import in the cache (made now
    when missing), loaded as weights only with the model's shape; its tokenizer unless
    ``--vocab_file`` names one. Runs before any process group: the ranks wait for the
    import through the file system (``checkpointing/import_cache.py``)."""
    c, tokenizer = config.checkpoint, config.tokenizer
    cached = ensure_imported(
        c.load, c.import_cache_dir or default_cache_dir(c.save),
        ImportOptions(vocab_extra_ids_list=tokenizer.vocab_extra_ids_list,
                      tokenizer_type=tokenizer.tokenizer_type, vocab_file=tokenizer.vocab_file),
        announce=int(os.environ.get("RANK", "0")) == 0, progress=sys.stderr.isatty())
    if not tokenizer.vocab_file:
        tokenizer = _own_tokenizer(tokenizer,
                                   tokenizer_config_from_run(cached.path, cached.run_config))
    return dataclasses.replace(config, tokenizer=tokenizer, checkpoint=dataclasses.replace(
        c, load=cached.path, finetune=True, use_checkpoint_args=True))


def _with_auto_resume(config: TrainConfig) -> TrainConfig:
    """``--auto_resume``: a checkpoint in ``--save`` replaces ``--load`` (a full resume:
    optimizer, schedule, data position); without one, ``--load`` as given. (LoRA/DoRA
    runs always resume their adapters from ``--save``.)"""
    c = config.checkpoint
    if not c.auto_resume or not c.save or latest_iteration(c.save) is None:
        return config
    if c.load and os.path.abspath(c.load) == os.path.abspath(c.save):
        return config
    if int(os.environ.get("RANK", "0")) == 0:
        logger.info("--auto_resume: %s holds a checkpoint; resuming from it instead of --load "
                    "%s", c.save, c.load)
    return dataclasses.replace(config, checkpoint=dataclasses.replace(
        c, load=c.save, finetune=False, use_checkpoint_args=True))


def _with_checkpoint_model_args(config: TrainConfig) -> TrainConfig:
    """``--use_checkpoint_args``: the model shape saved with the checkpoint in ``--load``."""
    load, save = config.checkpoint.load, config.checkpoint.save
    if (os.path.abspath(load) == os.path.abspath(save or "")
            and (not os.path.isdir(load) or latest_iteration(load) is None)):
        return config  # auto-resume idiom, first launch: the command line has the shape
    saved = read_run_config(load)["model"]
    # the sample length stays this run's: it is a data setting, not the model's
    return config.with_model(ModelArgs.from_dict(
        {k: v for k, v in saved.items() if k != "seq_length"}, base=config.model))


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import psutil

        return psutil.Process(os.getpid()).memory_info().rss / 2**20
    except ImportError:
        return float("nan")
