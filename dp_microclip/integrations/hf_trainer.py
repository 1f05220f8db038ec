"""dp_microclip under an unchanged ``transformers.Trainer``: ``DPTrainer`` and ``PrivacyCallback``.

``DPTrainer`` is a ``Trainer`` with a few overrides and no copy of its loop:

* ``create_optimizer``: the Trainer builds its optimizer as usual (or takes yours), then
  ``dp_microclip.attach(model, optimizer, **attach_kwargs)`` attaches the engine to it;
* ``get_train_dataloader``: the train set is sampled by ``engine.data_loader`` (Poisson: each record
  joins each step independently with probability ``q``; batches vary in size and may be empty), in
  physical chunks of at most ``per_device_train_batch_size`` examples, collated by the Trainer's
  collator (unused columns removed as the Trainer does); the Trainer gets ONE item per sampled
  logical batch (:class:`LogicalBatch`, the list of its chunks), so its ``global_step``, learning-rate
  schedule, logging, ``max_steps`` and epochs count logical steps;
* ``training_step``: forward and backward on every chunk of the logical batch; the Trainer's one
  ``optimizer.step()`` that follows makes the engine's one update (one noise draw, one ledger step);
* ``compute_loss``: ``labels`` are taken out of the batch, the model runs without them, and the loss
  is the mean of **per-example** losses (``dp_microclip.losses``), never HF's batch-wide token mean.

``PrivacyCallback`` (added first, so loggers see its keys) writes ``epsilon`` into every log the
Trainer makes in DP mode, drops the Trainer's ``grad_norm`` (the Trainer reads ``p.grad`` before the
engine writes it at the optimizer step, so that number is not the gradient that trained), and
prints the privacy statement when training ends.

transformers is imported here, never by ``import dp_microclip``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import IterableDataset
from transformers import Trainer, TrainerCallback
from transformers.models.auto import modeling_auto
from transformers.trainer_utils import seed_worker

import dp_microclip

from ..engine import Engine
from ..errors import ConfigurationError, PrivacyError
from ..losses import causal_lm_per_example_loss, per_example_mean_loss, sequence_classification_per_example_loss
from .logical_batches import LogicalBatch, LogicalBatchLoader, order_checked

__all__ = ["DPTrainer", "PrivacyCallback", "auto_per_example_loss"]

logger = logging.getLogger(__name__)

PerExampleLoss = Callable[[Any, torch.Tensor], torch.Tensor]  # (model outputs, labels) -> (B,) losses


def _class_names(*mappings: Mapping) -> set[str]:
    names: set[str] = set()
    for mapping in mappings:
        for value in mapping.values():
            names.update((value,) if isinstance(value, str) else value)
    return names


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a peft wrapper (its class says which task it is), else the model."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def auto_per_example_loss(model: torch.nn.Module, label_smoothing: float = 0.0) -> PerExampleLoss:
    """The per-example loss of ``model``'s task, chosen from its HF class (``per_example_loss="auto"``).

    * causal LMs (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...): next-token cross-entropy, each
      example's mean over its own counted tokens (:func:`~dp_microclip.losses.causal_lm_per_example_loss`);
    * sequence classification: cross-entropy / squared error / binary cross-entropy by
      ``config.problem_type``, as HF computes it
      (:func:`~dp_microclip.losses.sequence_classification_per_example_loss`);
    * token classification, masked LM and sequence-to-sequence LM: cross-entropy over each example's
      own non-ignored positions, no shift (:func:`~dp_microclip.losses.per_example_mean_loss`).

    Raises:
        ConfigurationError: another model class, naming the fix (``per_example_loss=`` a function).
    """
    base = _base_model(model)
    name = type(base).__name__
    if name in _class_names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        return lambda outputs, labels: causal_lm_per_example_loss(outputs.logits, labels,
                                                                  label_smoothing=label_smoothing)
    if name in _class_names(modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES):
        problem_type = getattr(getattr(base, "config", None), "problem_type", None)
        return lambda outputs, labels: sequence_classification_per_example_loss(
            outputs.logits, labels, problem_type=problem_type, label_smoothing=label_smoothing)
    if name in _class_names(modeling_auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
                            modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
                            modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES):
        return lambda outputs, labels: per_example_mean_loss(outputs.logits, labels, label_smoothing=label_smoothing)
    raise ConfigurationError(
        f"DPTrainer(per_example_loss='auto') does not know the task of {name}. Pass per_example_loss=fn, where "
        "fn(outputs, labels) returns one loss per example, shape (B,) (see dp_microclip.losses)."
    )


def _batch_size(inputs) -> int | None:
    """Rows of a collated batch (its first tensor's first dimension), or None without a tensor."""
    for value in inputs.values() if isinstance(inputs, Mapping) else ():
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
    return None


class PrivacyCallback(TrainerCallback):
    """Epsilon in the Trainer's logs at every logging step, and the privacy statement when training ends.

    ``DPTrainer`` adds one itself (first in the callback list, so reporters such as TensorBoard see
    ``epsilon``). With a plain ``Trainer`` driving an engine you attached yourself, pass
    ``PrivacyCallback(engine)`` in ``callbacks=``.

    Attributes:
        engine: the engine whose ledger is reported (``DPTrainer`` sets it when it attaches).
        delta: the delta of the logged epsilon (None: the engine's).
        verbose: print the statement at the end of training (main process only).
        statement: the last privacy statement, once training ended.
    """

    def __init__(self, engine: Engine | None = None, *, delta: float | None = None, verbose: bool = True):
        self.engine = engine
        self.delta = delta
        self.verbose = verbose
        self.statement: str | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add ``epsilon`` (DP mode) to this log and drop ``grad_norm`` (the Trainer's reading is not the step's)."""
        if logs is None or self.engine is None:
            return
        # Trainer.log appended a copy of `logs` to the history just before calling the callbacks: edit both.
        entries = [logs] + ([state.log_history[-1]] if state.log_history else [])
        for entry in entries:
            entry.pop("grad_norm", None)
        if self.engine.dp:
            epsilon = self.engine.epsilon(self.delta)
            for entry in entries:
                entry["epsilon"] = epsilon

    def on_train_end(self, args, state, control, **kwargs):
        """Keep the privacy statement (and print it with ``verbose``); DP mode also logs the final epsilon."""
        if self.engine is None:
            return
        self.statement = self.engine.privacy_statement(self.delta)
        if self.engine.dp:
            state.log_history.append({"epsilon": self.engine.epsilon(self.delta), "step": state.global_step,
                                      "privacy_statement": self.statement})
        if self.verbose and state.is_world_process_zero:
            print(self.statement)


class DPTrainer(Trainer):
    """A ``transformers.Trainer`` that trains through a dp_microclip engine, noise-free or DP.

    Usage (the whole guide: docs/trainer.md):

    ```python
    trainer = DPTrainer(model=model, train_dataset=train_set, data_collator=collator,
                        args=TrainingArguments(..., per_device_train_batch_size=16),  # physical chunk
                        attach_kwargs=dict(micro_batch_size=1, max_grad_norm=1.0,
                                           privacy=dp_microclip.DP(noise_multiplier=1.0, sample_rate=q,
                                                                   delta=1e-5)))
    trainer.train()   # one step per sampled batch of q N examples; epsilon in every log; the statement at the end
    ```

    What differs from a plain ``Trainer`` run:

    * each optimizer step is ONE Poisson sample of the train set drawn by ``engine.data_loader`` (the
      logical batch: ``q N`` examples on average in DP mode, ``logical_batch_size`` noise-free),
      processed in physical chunks of at most ``per_device_train_batch_size`` examples; ``global_step``,
      the learning-rate schedule, logging, ``max_steps`` and epochs count logical steps, one epoch is
      ``round(1/q)`` of them. ``train_sampling_strategy`` must stay ``"random"``;
    * the loss is a mean of per-example losses (``per_example_loss``), not the model's ``labels=`` loss;
    * the Trainer's own clipping (``max_grad_norm``, default 1.0) is turned off: the engine clips (its
      ``max_grad_norm`` in ``attach_kwargs``) and writes ``p.grad`` in the optimizer's step pre-hook,
      after the Trainer's ``clip_grad_norm_`` ran, so that call could only clip a gradient the engine
      then replaces (or none at all) and would report a norm that is not the step's;
    * ``gradient_accumulation_steps = k > 1``: noise-free, each step averages ``k`` sampled logical
      batches; DP mode refuses it (a DP step is one sampled batch: raise the logical batch instead);
    * refused, each with the reason: ``fp16`` (the loss scaler multiplies the loss before backward, so
      every micro-batch norm would be scaled; use ``bf16`` or float32), more than one process or GPU,
      DeepSpeed and FSDP, ``model_init``, ``auto_find_batch_size``, ``resume_from_checkpoint``, an
      iterable dataset, a custom ``_get_train_sampler``.

    Args:
        *args: ``Trainer``'s positional arguments.
        attach_kwargs: the keywords of ``dp_microclip.attach`` (``micro_batch_size``, ``max_grad_norm``,
            ``privacy=dp_microclip.DP(...)``, ``grad_mode``, ``seed``, ...).
        per_example_loss: ``"auto"`` (:func:`auto_per_example_loss`), a function
            ``(outputs, labels) -> (B,)``, or None for the model's own ``labels=`` loss (noise-free only:
            HF averages token losses over the whole batch, which couples examples).
        collate_keeps_order: your collator keeps rows in the order of its samples (needed in DP mode with
            ``micro_batch_size > 1``); None: True for transformers' own collators.
        logical_batch_size: the expected examples of one step's Poisson batch. Noise-free: default
            ``per_device_train_batch_size``. DP mode: ``q N`` from ``DP(sample_rate=q)``; if given, it must
            agree with it (it cannot change ``q``: epsilon is computed for ``q``).
        user_ids: with ``DP(privacy_unit="user", max_examples_per_user=k)``, one user id per train example
            (a list, a 1-D tensor, or a column name): users are Poisson-sampled, each sampled user's at most
            ``k`` examples form one micro-batch (``engine.data_loader(..., user_ids=...)``, docs/user-level.md).
        **kwargs: ``Trainer``'s keyword arguments.

    Attributes:
        engine: the attached :class:`dp_microclip.Engine` (None until training builds the optimizer).
        privacy_callback: the :class:`PrivacyCallback` this trainer added.
        logical_batch_size: as passed (None: derived as above when training starts).
        user_ids: as passed.
    """

    def __init__(self, *args, attach_kwargs: Mapping[str, Any], per_example_loss: str | PerExampleLoss | None = "auto",
                 collate_keeps_order: bool | None = None, logical_batch_size: int | None = None, user_ids=None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(attach_kwargs, Mapping) or {"model", "optimizer"} & set(attach_kwargs):
            raise ConfigurationError(
                "attach_kwargs takes the keywords of dp_microclip.attach other than the model and optimizer "
                "(DPTrainer passes those), e.g. dict(micro_batch_size=1, max_grad_norm=1.0)."
            )
        if self.model_init is not None:
            raise ConfigurationError("DPTrainer(model_init=...) would build a new model the engine is not attached to; "
                                     "pass model= instead.")
        if per_example_loss is not None and self.compute_loss_func is not None:
            raise ConfigurationError(
                "compute_loss_func returns one number for the batch, and DPTrainer needs one loss per example. Pass "
                "per_example_loss=fn with fn(outputs, labels) -> (B,) instead of compute_loss_func."
            )
        if logical_batch_size is not None and (isinstance(logical_batch_size, bool)
                                               or not isinstance(logical_batch_size, int) or logical_batch_size < 1):
            raise ConfigurationError(f"logical_batch_size must be an int >= 1 (expected examples per optimizer step), "
                                     f"or None. Found {logical_batch_size!r}.")
        self.attach_kwargs: dict[str, Any] = dict(attach_kwargs)
        self.collate_keeps_order: bool | None = collate_keeps_order
        self.logical_batch_size: int | None = logical_batch_size
        self.user_ids: Any = user_ids
        self.per_example_loss: PerExampleLoss | None
        if isinstance(per_example_loss, str):
            if per_example_loss != "auto":
                raise ConfigurationError(f"per_example_loss={per_example_loss!r}: pass 'auto', a function "
                                         "(outputs, labels) -> (B,), or None.")
            self.per_example_loss = auto_per_example_loss(self.model, self.args.label_smoothing_factor)
        else:
            self.per_example_loss = per_example_loss
        self.engine: Engine | None = None
        # compute_loss returns each chunk's plain mean loss: the engine combines the chunks and the logical
        # batches of a step, and dividing by the accumulation steps before backward would scale every norm.
        self.loss_is_scaled_for_ga = True
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            logger.info("DPTrainer: TrainingArguments.max_grad_norm=%s turned off; the engine clips (attach_kwargs' "
                        "max_grad_norm).", self.args.max_grad_norm)
            self.args.max_grad_norm = 0.0
        self.privacy_callback: PrivacyCallback = PrivacyCallback()
        self.callback_handler.callbacks.insert(0, self.privacy_callback)
        self._check_setup()

    # ------------------------------------------------------------------ set-up checks
    def _check_setup(self) -> None:
        args = self.args
        if args.fp16:
            raise ConfigurationError(
                "DPTrainer refuses fp16=True: the loss scaler multiplies the loss before backward, so every "
                "micro-batch gradient norm the engine clips would be scaled too (and the scaler finds no gradient "
                "to unscale: the engine writes them at the step). Use bf16=True or float32."
            )
        if args.world_size > 1 or args.n_gpu > 1:
            raise ConfigurationError(
                f"DPTrainer runs in one process on one device (world_size={args.world_size}, n_gpu={args.n_gpu}). "
                "For several processes use the engine with torchrun (tutorials/06_torchrun.py)."
            )
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ConfigurationError("DPTrainer does not support DeepSpeed or FSDP yet; train without them.")
        if str(args.train_sampling_strategy) != "random":
            raise ConfigurationError(
                f"DPTrainer samples the train set itself (Poisson, engine.data_loader), so "
                f"train_sampling_strategy={args.train_sampling_strategy!r} would be ignored. Set it to 'random'."
            )
        if args.auto_find_batch_size:
            raise ConfigurationError(
                "DPTrainer refuses auto_find_batch_size=True: its retry after an out-of-memory error would restart "
                "training on an engine that already took steps. per_device_train_batch_size is only the physical "
                "chunk (the logical batch is separate): lower it until a chunk fits."
            )
        if type(self)._get_train_sampler is not Trainer._get_train_sampler:
            raise ConfigurationError(
                "A custom _get_train_sampler would be ignored: DPTrainer's batches are Poisson samples drawn by "
                "engine.data_loader (the sampling epsilon is computed for). Remove the override."
            )

    def _check_dp_step_setup(self, engine: Engine) -> None:
        if engine.dp and self.args.gradient_accumulation_steps > 1:
            raise PrivacyError(
                f"gradient_accumulation_steps={self.args.gradient_accumulation_steps} in DP mode: a DP step is ONE "
                "Poisson-sampled batch (noise and the ledger count it once), so the Trainer's accumulation of "
                "several batches per step cannot map onto it. Set gradient_accumulation_steps=1; for a larger batch "
                "raise DP(sample_rate=...): DPTrainer already splits each sampled batch into physical chunks of "
                "per_device_train_batch_size examples."
            )

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """``Trainer.train``; refuses ``resume_from_checkpoint`` (the engine's ledger and the Poisson loader's
        position are not in the Trainer's checkpoints yet, so a resumed epsilon would miss the earlier steps)."""
        if resume_from_checkpoint:
            raise ConfigurationError(
                "DPTrainer.train(resume_from_checkpoint=...) is not supported: Trainer checkpoints hold neither the "
                "engine's privacy ledger nor its sampler's position, so epsilon would restart at the resume point. "
                "Train in one run, or drive the engine in your own loop with engine.state_dict()/load_state_dict()."
            )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # ------------------------------------------------------------------ optimizer and engine
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (built as usual, or the one passed in ``optimizers=``), with the engine attached."""
        optimizer = super().create_optimizer(model)
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's AcceleratedOptimizer
        if self.engine is None:
            assert self.model is not None and inner is not None  # model_init is refused; the optimizer exists now
            self.engine = dp_microclip.attach(self.model, inner, **self.attach_kwargs)
            self.privacy_callback.engine = self.engine
        elif self.engine.optimizer is not inner:
            raise ConfigurationError("DPTrainer's optimizer was replaced after the engine was attached to it; keep one "
                                     "optimizer for the whole run (self.optimizer).")
        return optimizer

    def _expected_batch(self, dataset_size: int) -> int | None:
        """The ``batch_size`` for ``engine.data_loader``: None when the engine has a sample rate (DP mode)."""
        assert self.engine is not None
        q, wanted = self.engine.sample_rate, self.logical_batch_size
        if q is None:
            return wanted if wanted is not None else self.args.per_device_train_batch_size
        if wanted is not None and self.user_ids is not None:
            raise ConfigurationError(
                f"logical_batch_size={wanted} with user_ids: a step samples users (q U of them on average), so its "
                "batch is set by DP(sample_rate=q) alone. Leave logical_batch_size out."
            )
        if wanted is not None and abs(wanted - q * dataset_size) > 0.5:
            raise ConfigurationError(
                f"logical_batch_size={wanted} disagrees with the engine's sample_rate={q} x len(train_dataset)="
                f"{dataset_size} = {q * dataset_size:.1f} examples per step. The sample rate fixes the logical "
                f"batch (and epsilon): pass logical_batch_size={round(q * dataset_size)} or leave it out, or change "
                "DP(sample_rate=...)."
            )
        return None

    def get_train_dataloader(self) -> LogicalBatchLoader:  # type: ignore[override]
        """The engine's Poisson loader over the train set in physical chunks, one :class:`LogicalBatch` per item."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if isinstance(self.train_dataset, IterableDataset):
            raise ConfigurationError("Poisson sampling draws every record of the train set at each step: pass a "
                                     "map-style dataset (with __len__ and __getitem__), not an IterableDataset.")
        self._check_setup()
        self.create_optimizer()  # the engine must exist now: the Trainer builds its optimizer only after this call
        assert self.engine is not None
        self._check_dp_step_setup(self.engine)
        dataset = self.train_dataset
        user_ids = self.user_ids
        if isinstance(user_ids, str):  # a column name: read it before unused columns are removed
            user_ids = dataset[user_ids]
        with contextlib.suppress(ImportError):
            import datasets  # noqa: PLC0415  (optional, as in Trainer)

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="Training")
        collate = self._get_collator_with_removed_columns(self.data_collator, description="Training")
        keeps_order = self.collate_keeps_order
        if keeps_order is None:
            keeps_order = type(self.data_collator).__module__.startswith("transformers.") or getattr(
                self.data_collator, "__module__", "").startswith("transformers.")
        loader_kwargs: dict[str, Any] = {"num_workers": self.args.dataloader_num_workers,
                                         "pin_memory": self.args.dataloader_pin_memory}
        workers = self.args.dataloader_num_workers
        if workers > 0:
            loader_kwargs.update(persistent_workers=self.args.dataloader_persistent_workers,
                                 worker_init_fn=functools.partial(seed_worker, num_workers=workers, rank=0))
        if self.engine.dp and self.engine.micro_batch_size > 1:
            collate = order_checked(collate)  # the engine's check at the model input cannot see the collator's order
        loader = self.engine.data_loader(dataset, self._expected_batch(len(dataset)),  # type: ignore[arg-type]
                                         user_ids=user_ids, collate_fn=collate, collate_keeps_order=keeps_order,
                                         max_physical_batch_size=self.args.per_device_train_batch_size,
                                         **loader_kwargs)
        return LogicalBatchLoader(loader)

    def get_total_train_batch_size(self, args) -> int:
        """Expected examples per optimizer step (the logical batch times the accumulation steps), for reports."""
        if self.engine is None or self.engine.sample_rate is None or self.train_dataset is None or self.user_ids:
            return super().get_total_train_batch_size(args)  # user-level: q U users, a number of examples unknown
        logical = self.engine.sample_rate * len(self.train_dataset)  # type: ignore[arg-type]
        return max(1, round(logical)) * args.gradient_accumulation_steps

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's estimate, summed over the chunks of a logical batch."""
        if isinstance(inputs, LogicalBatch):
            return sum(super(DPTrainer, self).floating_point_ops(chunk) for chunk in inputs)
        return super().floating_point_ops(inputs)

    # ------------------------------------------------------------------ one step
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Forward and backward on every chunk of one logical batch (the Trainer's optimizer step follows).

        Each chunk backpropagates its own plain mean loss (the engine sums the clipped contributions of
        the chunks and draws the noise once, at the step). Returns the logical batch's mean per-example
        loss for the Trainer's reports, divided by the accumulation steps as the Trainer expects.
        """
        assert self.engine is not None  # get_train_dataloader attached it
        if not isinstance(inputs, LogicalBatch):
            if self.engine.dp:
                raise PrivacyError(
                    "DPTrainer.training_step got a batch that is not a LogicalBatch of its own train loader: in DP "
                    "mode every step must be one Poisson-sampled batch of engine.data_loader (DPTrainer."
                    "get_train_dataloader). Do not override get_train_dataloader or feed batches of another loader."
                )
            inputs = LogicalBatch([inputs])
        total = torch.zeros((), device=self.args.device)
        rows = 0
        sums = self.engine.settings.clip.loss_reduction == "sum"
        for chunk in inputs:
            size = _batch_size(chunk)
            if size == 0:
                # An empty Poisson batch (HF models cannot run on zero rows): no forward, no backward; the
                # optimizer step that follows adds the noise alone in DP mode, and does nothing noise-free.
                self.engine.take_empty_batch()
                continue
            loss = super().training_step(model, chunk, None)
            total = total + (loss if sums or size is None else loss * size)
            rows += size or 1
        return total / max(rows, 1) / self.current_gradient_accumulation_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The mean of per-example losses; ``labels`` are taken out of the batch, so the model computes no loss."""
        training = model.training and torch.is_grad_enabled()
        if self.per_example_loss is None:
            if training and self.engine is not None and self.engine.dp:
                raise PrivacyError(
                    "DPTrainer(per_example_loss=None) trains on the model's own labels= loss, which HuggingFace "
                    "averages over every token of the batch: each example's weight depends on the other examples' "
                    "lengths, so the DP analysis does not hold. Use per_example_loss='auto' (the default) or a "
                    "function (outputs, labels) -> (B,) per-example losses."
                )
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            if training:
                raise ConfigurationError(
                    "The training batch has no 'labels', which per_example_loss needs. Have the collator produce "
                    "them (e.g. DataCollatorForLanguageModeling(tokenizer, mlm=False) for causal LMs)."
                )
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs)
        if self.engine is not None and training:  # engine.loss reduces; DP mode checks the loss is per example
            loss = self.engine.loss(self.per_example_loss, outputs, labels)
            return (loss, outputs) if return_outputs else loss
        per_example = self.per_example_loss(outputs, labels)
        if per_example.shape != labels.shape[:1]:
            raise ConfigurationError(
                f"per_example_loss returned shape {tuple(per_example.shape)}; it must return one loss per example, "
                f"shape ({labels.shape[0]},)."
            )
        reduction = self.engine.settings.clip.loss_reduction if self.engine is not None else "mean"
        # An empty Poisson batch: a zero loss (still a step: the engine adds the noise of an empty batch).
        loss = per_example.sum() if reduction == "sum" or len(per_example) == 0 else per_example.mean()
        return (loss, outputs) if return_outputs else loss
