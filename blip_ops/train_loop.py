"""The fine-tuning loop: optimiser, schedule, clipping, mixed precision, evaluation, checkpoints.

:func:`fit` drives :func:`blip_ops.training.retrieval_train_step` for a number of steps:

- AdamW over the model's parameters and the learnable ITC temperature (no weight decay on biases,
  LayerNorms or the temperature), linear warm-up then cosine decay to zero;
- gradient clipping by global norm; bf16 autocast on CUDA only (weights stay float32);
- with ``torch.distributed`` initialised, the gradients are averaged over ranks explicitly after
  backward (:func:`sync_gradients`). The train step calls the model's submodules directly, never
  ``forward``, so a DDP wrapper would never see the backward pass and would sync nothing;
- every ``eval_every`` steps (and at the end) ``eval_fn(model)`` is asked for metrics with a
  ``mean`` recall; the best so far is saved to ``out_dir/best``, and ``out_dir/last`` always holds
  the latest state: the ``save_pretrained`` files of ``HFBlipModel.save``, the resolved config
  (when given) and ``trainer_state.pt`` (step, optimiser, schedule, temperature, RNG states, best
  recall, history, and with ``momentum`` the EMA copy and its feature queues), from which a later
  :func:`fit` resumes;
- ``momentum=True`` turns on BLIP's momentum distillation (:mod:`blip_ops.momentum`): an EMA copy
  with momentum ``momentum_m``, queues of ``queue_size`` entries and the distillation weight
  ramped from 0 to ``alpha`` over ``alpha_warmup_steps`` (default: ``warmup_steps``);
- samples/s (the progress lines and the summary) count training time only: evaluation and
  checkpoint writing are left out (the summary reports them as ``eval_seconds``).

Batches come from ``next_batch(step)``, so a resumed run asks for exactly the batches an
uninterrupted one would have (with a deterministic ``next_batch``, 2 + 2 steps equal 4 steps).

No Ray; imports only torch at module load.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from blip_ops.losses import TEMP_INIT, NegativeSampler, make_temperature, sample_hard_negatives

if TYPE_CHECKING:
    from blip_ops.hf_blip import HFBlipModel

TRAINER_STATE = "trainer_state.pt"
CONFIG_FILE = "finetune.config.resolved.yaml"
OPTIMIZERS = ("adamw", "sgd")
# on_checkpoint(step, {"step", "mean_recall"}, final): after each evaluation and checkpoint.
CheckpointHook = Callable[[int, dict, bool], None]


@dataclass(frozen=True)
class TrainSettings:
    """Everything :func:`fit` needs to know about a run, in one typed object."""

    steps: int  # optimiser steps; the schedule spans them
    lr: float = 1e-4  # peak rate of the fresh parts (of every part when lr_pretrained is None)
    lr_pretrained: float | None = None  # peak rate of the pretrained encoders; None = lr
    lr_temp: float | None = None  # peak rate of the ITC temperature (never decayed); None = lr
    weight_decay: float = 0.05  # AdamW decay of matrices (none on biases, norms, temperature)
    warmup_steps: int = 0  # linear warm-up, then cosine decay to 0 at ``steps``
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    negatives: str = "hard"  # ITM negatives: "hard" (BLIP) or "random" (the ablation)
    seed: int = 0  # init order and negative sampling
    eval_every: int = 0  # evaluate + checkpoint every N steps; 0 = at the end only
    out_dir: str | Path | None = None  # best/ and last/ checkpoints; None = keep nothing
    resume: bool = True  # continue from out_dir/last when it exists
    mixed_precision: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    optimizer: str = "adamw"  # "sgd" (no momentum) exists for exactness tests
    log_every: int = 10  # progress line every N steps
    momentum: bool = False  # BLIP's momentum encoder + feature queue for ITC
    momentum_m: float = 0.995  # EMA momentum of that encoder
    queue_size: int = 4096  # momentum feature queue length
    alpha: float = 0.4  # distillation weight, ramped from 0
    alpha_warmup_steps: int | None = None  # its ramp; None = warmup_steps
    mined_weight: float = 1.0  # sampling mass of a batch's mined pairs (one process only)
    itm_titles: str = "all"  # ITM pairs per step: "all" titles or "one" per image
    itm_balanced: bool = False  # ITM loss weighs positives and negatives equally in total
    easy_steps: int = 0  # first steps: random ITM negatives and no swapped titles (a curriculum)
    # Keep the text encoder's word-embedding matrix fixed: it is the largest tensor (30522 x 384
    # for MiniLM, 44% of the compact model's trainable weights), and on a CPU its dense AdamW
    # update and gradient cost more than the text it embeds.
    freeze_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for name in ("lr", "lr_pretrained", "lr_temp"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    def replace(self, **changes: Any) -> TrainSettings:
        return dataclasses.replace(self, **changes)


# ---- distributed --------------------------------------------------------------------------------
def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def sync_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over all ranks (one all-reduce of a flat buffer).

    A parameter without a gradient on this rank counts as zero, so every rank reduces the same
    buffer layout. Nothing happens without ``torch.distributed`` or with one rank.
    """
    world = world_size()
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])  # (sum of numels,)
    torch.distributed.all_reduce(flat)  # sum over ranks
    flat /= world
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
        offset += n


# ---- optimiser and schedule ---------------------------------------------------------------------
def word_embeddings(model: HFBlipModel) -> torch.nn.Module:
    """The text encoder's token-embedding table (BERT's ``embeddings.word_embeddings``)."""
    table = getattr(getattr(model.model.text_encoder, "embeddings", None), "word_embeddings", None)
    if not isinstance(table, torch.nn.Embedding):
        raise ValueError(
            f"{type(model.model.text_encoder).__name__} has no embeddings.word_embeddings table "
            "to freeze"
        )
    return table


def param_groups(model: HFBlipModel, temp: torch.nn.Parameter, settings: TrainSettings) -> list[dict]:
    """AdamW groups: fresh and pretrained parts each split into decayed matrices and undecayed
    biases / norms (as BLIP, timm and HF trainers do), and the temperature alone (no decay).

    Each group carries its ``name`` and peak ``lr``; empty groups are left out.
    """
    roles = model.parameter_roles()
    rates = {
        "fresh": settings.lr,
        "pretrained": settings.lr if settings.lr_pretrained is None else settings.lr_pretrained,
    }
    buckets: dict[tuple[str, bool], list] = {}
    for name, p in model.model.named_parameters():
        if not p.requires_grad:
            continue
        role = roles.get(name, "fresh")
        decay = not (p.ndim < 2 or "norm" in name.lower())
        buckets.setdefault((role, decay), []).append(p)
    groups = [
        {
            "name": f"{role}{'' if decay else '_no_decay'}",
            "params": params,
            "lr": rates[role],
            "weight_decay": settings.weight_decay if decay else 0.0,
        }
        for (role, decay), params in sorted(buckets.items())
    ]
    lr_temp = settings.lr if settings.lr_temp is None else settings.lr_temp
    groups.append({"name": "temperature", "params": [temp], "lr": lr_temp, "weight_decay": 0.0})
    return groups


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _recent_accuracy(per_step: list[list[float | None]], window: int = 20) -> dict:
    """Mean ITM train accuracy over the last ``window`` steps, per pair kind: a head that says
    "no" to everything shows pos 0.0 / neg 1.0 here, whatever its overall accuracy."""
    recent = per_step[-window:]
    out = {}
    for i, kind in enumerate(("pos", "neg", "swap")):
        values = [row[i] for row in recent if row[i] is not None]
        out[kind] = sum(values) / len(values) if values else None
    return out


def lr_factor(step: int, *, steps: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine decay to 0 at ``steps`` (step is 0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- checkpoints ---------------------------------------------------------------------------------
def save_checkpoint(
    model: HFBlipModel, path: Path, trainer_state: dict | None, config_yaml: str | None
) -> str:
    """Write ``path`` atomically (a temp folder renamed over it); returns the saved model_id."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    if config_yaml is not None:
        (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
    model_id = model.current_model_id()
    (tmp / "model_id.txt").write_text(model_id + "\n", encoding="utf-8")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return model_id


# ---- the loop --------------------------------------------------------------------------------------
def fit(
    model: HFBlipModel,
    next_batch: Callable[[int], Any],
    settings: TrainSettings,
    *,
    eval_fn: Callable[[HFBlipModel], Mapping[str, Any]] | None = None,
    config_yaml: str | None = None,
    stop_at: int | None = None,
    log: Callable[[str], None] | None = print,
    negative_sampler: NegativeSampler = sample_hard_negatives,
    on_checkpoint: CheckpointHook | None = None,
) -> dict:
    """Train ``model`` in place for ``settings.steps`` optimiser steps; returns a summary dict.

    ``next_batch(step)`` gives the batch of 0-based ``step`` (this rank's share under
    ``torch.distributed``). ``eval_fn(model)`` returns metrics with a ``mean`` (higher is better;
    it picks the best checkpoint, so it must read validation data, never the test split); only
    rank 0 evaluates and writes checkpoints. ``stop_at`` ends this run early (at that step,
    checkpointed) without changing the schedule, which spans ``settings.steps``. ``log`` None is
    silent. ``negative_sampler`` draws the ITM negatives (BLIP's similarity-weighted sampling by
    default). A batch with ``mined_pairs`` has them upweighted by ``settings.mined_weight``
    (:meth:`blip_ops.training.RetrievalBatch.mined_negatives`; one process only).
    ``on_checkpoint(step, metrics, final)`` is called on every rank after each evaluation and
    checkpoint (``out_dir/last`` written on rank 0), e.g. to hand it to a trainer's storage.
    """
    run = _Run(model, settings, eval_fn, config_yaml, log or (lambda _msg: None), negative_sampler)
    run.on_checkpoint = on_checkpoint
    run.resume_or_seed()
    run.start_momentum()
    return run.train(next_batch, stop_at)


class _Run:
    """One call of :func:`fit`: the optimiser, schedule, sampler RNG and bookkeeping it carries."""

    def __init__(self, model, st: TrainSettings, eval_fn, config_yaml, log, sampler) -> None:
        self.model, self.st, self.eval_fn, self.config_yaml = model, st, eval_fn, config_yaml
        self.log, self.sampler = log, sampler
        self.main_rank = rank() == 0
        self.out = Path(st.out_dir) if st.out_dir is not None else None
        self.net = model.model
        self.temp = torch.nn.Parameter(make_temperature(TEMP_INIT).to(model.device).detach())
        if st.freeze_word_embeddings:
            word_embeddings(model).requires_grad_(False)
        groups = param_groups(model, self.temp, st)
        self.params = [p for g in groups for p in g["params"]]
        if st.optimizer == "adamw":
            self.opt = torch.optim.AdamW(groups, lr=st.lr, betas=(0.9, 0.999))
        else:
            self.opt = torch.optim.SGD(groups, lr=st.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, steps=st.steps, warmup_steps=st.warmup_steps)
        )
        self.generator = torch.Generator(device="cpu").manual_seed(st.seed * 1000 + rank())
        self.start_step, self.best, self.history = 0, None, []
        self.resumed_momentum = None
        self.distiller = None
        self.ramp = st.warmup_steps if st.alpha_warmup_steps is None else st.alpha_warmup_steps
        self.losses: list[float] = []  # this run's per-step losses (this rank's share)
        self.accuracy: list[list[float | None]] = []  # per step: ITM accuracy pos / neg / swap
        self.last_out: dict = {}
        self.eval_seconds = 0.0  # evaluation + checkpoints, kept out of every samples/s figure
        self.on_checkpoint: CheckpointHook | None = None

    # ---- start --------------------------------------------------------------------------------
    def resume_or_seed(self) -> None:
        last = self.out / "last" if self.out is not None else None
        if not (self.st.resume and last is not None and (last / TRAINER_STATE).is_file()):
            torch.manual_seed(self.st.seed)
            return
        state = torch.load(last / TRAINER_STATE, map_location="cpu", weights_only=False)
        self.model.load_weights(last)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        with torch.no_grad():
            self.temp.fill_(float(state["temperature"]))
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng.get("cuda") is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
        saved = rng["negatives"]
        self.generator.set_state(saved[rank()] if rank() < len(saved) else saved[0])
        self.start_step, self.best = state["step"], state.get("best")
        self.history = state.get("history", [])
        self.resumed_momentum = state.get("momentum")
        self.log(f"resumed from {last} at step {self.start_step} (best mean recall {self.best})")

    def start_momentum(self) -> None:
        if not self.st.momentum:
            return
        from blip_ops.momentum import MomentumDistiller

        # Built after any resume has loaded the weights: a fresh copy starts equal to the model.
        self.distiller = MomentumDistiller(
            self.net, m=self.st.momentum_m, queue_size=self.st.queue_size
        )
        if self.resumed_momentum is not None:
            self.distiller.load_state_dict(self.resumed_momentum)
        elif self.start_step > 0:
            self.log(
                f"resumed state has no momentum encoder: a fresh copy starts at step {self.start_step}"
            )

    # ---- the loop -----------------------------------------------------------------------------
    def train(self, next_batch: Callable[[int], Any], stop_at: int | None) -> dict:
        st = self.st
        end = min(st.steps, stop_at) if stop_at is not None else st.steps
        step = self.start_step
        window_start, window_samples = time.perf_counter(), 0
        total_samples, train_started = 0, time.perf_counter()
        self.net.train()
        while step < end:
            n = self.step(step, next_batch(step))
            step += 1
            window_samples += n
            total_samples += n
            if self.main_rank and (
                step % max(1, st.log_every) == 0 or step == end or step == self.start_step + 1
            ):
                elapsed = time.perf_counter() - window_start
                self.log(self._progress_line(window_samples / max(elapsed, 1e-9)))
                window_start, window_samples = time.perf_counter(), 0
            if st.eval_every and step % st.eval_every == 0 and step < end:
                window_start += self._timed_evaluation(step)  # the window skips the evaluation
        seconds = time.perf_counter() - train_started - self.eval_seconds
        if step > self.start_step or self.eval_fn is not None:
            self._timed_evaluation(step, final=True)
        self.net.eval()
        return self._summary(step, total_samples, seconds)

    def step(self, step: int, raw_batch) -> int:
        """One optimiser step on ``raw_batch``; returns the samples it counted (all ranks)."""
        from blip_ops.training import RetrievalBatch, retrieval_train_step

        st, device = self.st, self.model.device
        batch = RetrievalBatch.coerce(raw_batch)
        momentum_kw = {}
        if self.distiller is not None:
            from blip_ops.momentum import alpha_at

            momentum_kw = {"momentum": self.distiller, "alpha": alpha_at(step, st.alpha, self.ramp)}
        easy = step < st.easy_steps  # easy negatives first, so the fresh ITM head can start
        if easy:
            batch = dataclasses.replace(batch, swap_texts=(), swap_images=())
        extra = batch.mined_negatives(st.mined_weight)
        if extra is not None and world_size() > 1:
            # The sampling pool spans all ranks' columns; mined pairs index this rank's batch.
            raise ValueError("mined negative pairs are supported in a single process only")
        autocast = st.mixed_precision and device.type == "cuda"
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
            out = retrieval_train_step(
                self.model, batch, self.temp, negatives="random" if easy else st.negatives,
                generator=self.generator, extra_negatives=extra, itm_titles=st.itm_titles,
                sampler=self.sampler, itm_balanced=st.itm_balanced, **momentum_kw,
            )  # fmt: skip
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {step}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_gradients(self.params)
        grad_norm = None
        if st.grad_clip and st.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, st.grad_clip))
        lr_used = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.opt.param_groups)}
        self.opt.step()
        self.sched.step()
        self._record(step + 1, out, lr_used, grad_norm)
        return out["n_images"] * world_size()

    def _record(self, step: int, out: dict, lr_used: dict, grad_norm: float | None) -> None:
        loss = float(out["loss"].detach())
        self.losses.append(loss)
        self.accuracy.append([out[f"itm_accuracy_{k}"] for k in ("pos", "neg", "swap")])
        self.last_out = {
            "step": step,
            "loss": loss,
            "itc": float(out["itc"]),
            "itm": float(out["itm"]),
            "itm_accuracy": out["itm_accuracy"],
            "itm_accuracy_pos": out["itm_accuracy_pos"],
            "itm_accuracy_neg": out["itm_accuracy_neg"],
            "itm_accuracy_swap": out["itm_accuracy_swap"],
            "temp": float(self.temp.detach()),
            "lr": next(iter(lr_used.values())),
            "lrs": lr_used,
            "grad_norm": grad_norm,
            "mined_share": out["mined_share"],
        }
        if self.distiller is not None:
            self.last_out.update(alpha=out["alpha"], queue=out["queue"])

    def _progress_line(self, samples_per_s: float) -> str:
        o = self.last_out
        swap = f" swap {_fmt(o['itm_accuracy_swap'])}" if o["itm_accuracy_swap"] is not None else ""
        momentum = (
            f"alpha {o['alpha']:.3f} queue {o['queue']} " if self.distiller is not None else ""
        )
        mined = f"mined {o['mined_share']:.2f} " if o["mined_share"] is not None else ""
        return (
            f"step {o['step']}/{self.st.steps} loss {o['loss']:.4f} (itc {o['itc']:.4f} "
            f"itm {o['itm']:.4f}, acc {o['itm_accuracy']:.2f} pos "
            f"{_fmt(o['itm_accuracy_pos'])} neg {_fmt(o['itm_accuracy_neg'])}{swap}) temp "
            f"{o['temp']:.4f} lr {o['lr']:.2e} {momentum}{mined}{samples_per_s:.1f} samples/s"
        )

    # ---- evaluation and checkpoints -----------------------------------------------------------
    def _timed_evaluation(self, step: int, final: bool = False) -> float:
        paused = time.perf_counter()
        self.evaluate_and_save(step, final)
        seconds = time.perf_counter() - paused
        self.eval_seconds += seconds
        return seconds

    def trainer_state(self, step: int) -> dict:
        neg_states = [self.generator.get_state()]
        if world_size() > 1:  # every rank's sampler, so a resume on as many ranks continues each
            neg_states = [torch.empty(0)] * world_size()
            torch.distributed.all_gather_object(neg_states, self.generator.get_state())
        return {
            "step": step,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "temperature": float(self.temp.detach()),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "negatives": neg_states,
            },
            "best": self.best,
            "history": self.history,
            "momentum": self.distiller.state_dict() if self.distiller is not None else None,
            "settings": {**dataclasses.asdict(self.st), "out_dir": str(self.st.out_dir),
                         "alpha_warmup_steps": self.ramp},  # fmt: skip
        }

    def evaluate_and_save(self, step: int, final: bool = False) -> None:
        state = self.trainer_state(step)  # collective under torch.distributed: every rank calls it
        if self.main_rank and self.eval_fn is not None:
            self._evaluate(step, state)
        if self.main_rank and self.out is not None:
            save_checkpoint(self.model, self.out / "last", state, self.config_yaml)
        if world_size() > 1:
            torch.distributed.barrier()
        if self.on_checkpoint is not None:
            latest = self.history[-1] if self.history and self.history[-1]["step"] == step else {}
            self.on_checkpoint(step, {"step": step, "mean_recall": latest.get("mean")}, final)

    def _evaluate(self, step: int, state: dict) -> None:
        self.net.eval()
        started = time.perf_counter()
        metrics = dict(self.eval_fn(self.model))
        self.net.train()
        mean = metrics.get("mean")
        entry = {"step": step, "mean": mean, "seconds": round(time.perf_counter() - started, 2)}
        self.history.append(entry)
        state["history"] = self.history
        self.log(f"eval step {step}: mean recall {mean if mean is None else round(mean, 4)} "
                 f"({entry['seconds']}s)")  # fmt: skip
        if mean is not None and (self.best is None or mean > self.best):
            self.best = mean
            state["best"] = self.best
            if self.out is not None:
                best_id = save_checkpoint(self.model, self.out / "best", None, self.config_yaml)
                self.log(f"new best checkpoint {self.out / 'best'} ({best_id})")

    def _summary(self, step: int, total_samples: int, seconds: float) -> dict:
        out = self.out
        return {
            "steps": step,
            "start_step": self.start_step,
            "samples": total_samples,
            "seconds": round(seconds, 2),  # training only: evaluation and checkpoints excluded
            "eval_seconds": round(self.eval_seconds, 2),
            "samples_per_s": total_samples / seconds if seconds > 0 else None,
            "best_mean_recall": self.best,
            "history": self.history,
            "last": self.last_out,
            "losses": self.losses,
            "itm_accuracy_recent": _recent_accuracy(self.accuracy),
            "temperature": float(self.temp.detach()),
            "model_id": self.model.current_model_id(),
            "best_dir": str(out / "best") if out is not None and (out / "best").exists() else None,
            "last_dir": str(out / "last") if out is not None else None,
        }
