"""transformers Trainer integration: SparseAdamW handed to a Trainer, SparseTuningCallback, and
SparseTrainer (mask selected at train start, delta beside every checkpoint, exact resume).

Cheap tests use a 2-layer BERT with random weights; one test runs a real Trainer on the embedded
MiniLM with a small slice of Rotten Tomatoes and resumes it from a checkpoint.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import sparsetune as st
from sparsetune import data as st_data
from sparsetune.integrations import transformers as st_transformers
from sparsetune.integrations.transformers import (
    DELTA_FILE,
    MASK_FILE,
    SparseTrainer,
    SparseTuningCallback,
)

CONFIG = BertConfig(
    vocab_size=100,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=32,
    num_labels=2,
    hidden_dropout_prob=0.1,
)
HEAD = ["classifier.weight", "classifier.bias"]
# No dropout: a Trainer run and a hand-written loop then see the same function.
DETERMINISTIC = BertConfig(**{**CONFIG.to_dict(), "hidden_dropout_prob": 0.0,
                              "attention_probs_dropout_prob": 0.0})


def tiny_model(seed: int = 0, config: BertConfig = CONFIG) -> BertForSequenceClassification:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForSequenceClassification(config)


def tiny_data(n: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(0, 100, (12,), generator=gen),
            "attention_mask": torch.ones(12, dtype=torch.long),
            "labels": torch.randint(0, 2, (), generator=gen),
        }
        for _ in range(n)
    ]


def random_mask(model, density=0.05, seed=1) -> st.Mask:
    gen = torch.Generator().manual_seed(seed)
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in model.named_parameters()}
    return st.Mask.top_k(scores, density=density, always_train=HEAD)


def arguments(out, **overrides) -> TrainingArguments:
    values = dict(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def same_weights(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# -- Trainer(optimizers=(SparseAdamW, scheduler)) + SparseTuningCallback --------------------------
def test_trainer_with_sparse_adamw_saves_delta_and_mask_that_reproduce_each_checkpoint(tmp_path):
    base = tiny_model()
    model = copy.deepcopy(base)
    mask = random_mask(model)
    opt = st.SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = arguments(tmp_path, save_strategy="steps", save_steps=1, max_steps=2)
    callback = SparseTuningCallback(model, mask, method="random")
    Trainer(model=model, args=args, train_dataset=tiny_data(), optimizers=(opt, sched),
            callbacks=[callback]).train()

    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        saved = load_file(folder / "model.safetensors")
        assert st.Mask.load(folder / MASK_FILE, model=base) == mask
        delta = st.SparseDelta.load(folder / DELTA_FILE)
        assert delta.method == "random"
        rebuilt = delta.apply_to(copy.deepcopy(base))
        for name, p in rebuilt.named_parameters():
            assert torch.equal(p.detach(), saved[name]), (step, name)
        # Trainer's optimizer.pt (torch.save of state_dict) loads into SparseAdamW with the mask...
        state = torch.load(folder / "optimizer.pt", weights_only=True)
        fresh = st.SparseAdamW(copy.deepcopy(base), mask, lr=1e-2, weight_decay=0.1)
        fresh.load_state_dict(state)
        for p, s in fresh.state.items():
            assert s["exp_avg"].numel() == fresh.selection(p).count
        # ...and not with another mask.
        other = st.SparseAdamW(copy.deepcopy(base), random_mask(base, seed=2), lr=1e-2)
        with pytest.raises(st.StateMismatchError, match="mask digest"):
            other.load_state_dict(state)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach()[~mask[name]], base.get_parameter(name)[~mask[name]]), name


def test_trainer_resume_with_sparse_adamw_matches_an_uninterrupted_run(tmp_path):
    def run(resume=None):
        model = tiny_model()
        mask = random_mask(model)
        opt = st.SparseAdamW(model, mask, lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.5, total_iters=3)
        args = arguments(tmp_path, save_strategy="steps", save_steps=2, max_steps=3)
        Trainer(model=model, args=args, train_dataset=tiny_data(), optimizers=(opt, sched),
                callbacks=[SparseTuningCallback(model, mask)]).train(resume_from_checkpoint=resume)
        return model, opt

    whole, whole_opt = run()
    resumed, resumed_opt = run(str(tmp_path / "checkpoint-2"))
    assert same_weights(whole, resumed)
    for s, r in zip(whole_opt.state.values(), resumed_opt.state.values(), strict=True):
        assert s["step"] == r["step"] == 3
        assert torch.equal(s["exp_avg"], r["exp_avg"])
        assert torch.equal(s["exp_avg_sq"], r["exp_avg_sq"])


def test_callback_refuses_to_save_when_frozen_entries_moved(tmp_path):
    model = tiny_model()
    mask = random_mask(model)
    dense = torch.optim.AdamW(model.parameters(), lr=1e-2)  # not masked: everything moves
    args = arguments(tmp_path, save_strategy="steps", save_steps=1, max_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=tiny_data(),
                      optimizers=(dense, None), callbacks=[SparseTuningCallback(model, mask)])
    with pytest.raises(st.BaseModelMismatchError, match="outside the mask moved"):
        trainer.train()


def test_callback_needs_a_mask_covering_the_model():
    model = tiny_model()
    partial = st.Mask.from_dict({"classifier.bias": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(st.ParameterMismatchError, match="missing from the mask"):
        SparseTuningCallback(model, partial)
    with pytest.raises(st.InvalidArgumentError, match=r"sparsetune\.Mask"):
        SparseTuningCallback(model, {"classifier.bias": torch.ones(2, dtype=torch.bool)})


# -- SparseTrainer --------------------------------------------------------------------------------
def test_sparse_trainer_builds_the_optimizer_from_training_arguments(tmp_path):
    """SparseTrainer(mask=) equals a Trainer given MaskedOptimizer(AdamW) with the same groups."""
    hyper = dict(learning_rate=3e-3, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
                 weight_decay=0.1, max_steps=3, lr_scheduler_type="constant")
    mask = random_mask(tiny_model(), density=0.2)
    model = tiny_model().double()
    trainer = SparseTrainer(model=model, args=arguments(tmp_path / "a", **hyper),
                            train_dataset=tiny_data(), mask=mask)
    trainer.train()

    reference = tiny_model().double()
    no_decay = [n for n, _ in reference.named_parameters() if "bias" in n or "LayerNorm" in n]
    groups = [
        {"params": [p for n, p in reference.named_parameters() if n not in no_decay],
         "weight_decay": 0.1},
        {"params": [p for n, p in reference.named_parameters() if n in no_decay],
         "weight_decay": 0.0},
    ]
    inner = torch.optim.AdamW(groups, lr=3e-3, betas=(0.8, 0.95), eps=1e-6)
    dense = st.MaskedOptimizer(inner, mask, reference)
    Trainer(model=reference, args=arguments(tmp_path / "b", **hyper), train_dataset=tiny_data(),
            optimizers=(dense, torch.optim.lr_scheduler.LambdaLR(dense, lambda s: 1.0))).train()

    assert isinstance(trainer.optimizer.optimizer, st.SparseAdamW)  # inside accelerate's wrapper
    assert [g["weight_decay"] for g in trainer.optimizer.param_groups] == [0.1, 0.0]
    base = tiny_model().double()
    for (name, p), q, b in zip(model.named_parameters(), reference.parameters(),
                               base.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10, msg=name)
        assert torch.equal(p.detach()[~mask[name]], b.detach()[~mask[name]]), name


def test_sparse_trainer_selects_with_a_method_on_its_training_data(tmp_path):
    model = tiny_model()
    base = copy.deepcopy(model)
    trainer = SparseTrainer(model=model, args=arguments(tmp_path, max_steps=2),
                            train_dataset=tiny_data(), method="sam", density=0.01,
                            always_train=HEAD, selection_batches=2,
                            selection_options={"progress": False})
    rng_before = torch.random.get_rng_state()
    mask = trainer.select_mask()
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # selection left the RNG alone
    # The same scores from the first two batches of the same (seeded) training dataloader.
    batches = list(trainer.get_train_dataloader())[:2]
    expected = st.select(base, "sam", 0.01, data=batches, always_train=HEAD, progress=False)
    assert mask == expected
    trainer.train()
    assert trainer.sparse_mask == expected
    assert mask.num_selected == st.budget_size(mask.num_total, 0.01)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach()[~mask[name]], base.get_parameter(name)[~mask[name]]), name


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one of method"),
        (dict(method="sam", mask="MASK"), "exactly one of method"),
        (dict(method="sam"), "needs density"),
        (dict(method="no_such_method", density=0.1), "unknown method"),
        (dict(mask="MASK", density=0.1), "density= goes with method="),
        (dict(method="random", density=0.1, selection_batches=0), "selection_batches"),
        (dict(method="random", density=0.1, optimizers="OPT"), "builds its own SparseAdamW"),
        (dict(method="random", density=0.1, args=dict(optim="sgd")), "optim must be one of"),
        (dict(method="random", density=0.1, sparse_gradients="yes"), "sparse_gradients must be"),
    ],
)
def test_sparse_trainer_refuses_bad_configuration(tmp_path, kwargs, match):
    model = tiny_model()
    kwargs = dict(kwargs)
    if kwargs.get("mask") == "MASK":
        kwargs["mask"] = random_mask(model)
    if kwargs.get("optimizers") == "OPT":
        kwargs["optimizers"] = (torch.optim.SGD(model.parameters(), lr=0.1), None)
    args = arguments(tmp_path, **kwargs.pop("args", {}))
    with pytest.raises(st.InvalidArgumentError, match=match):
        SparseTrainer(model=model, args=args, train_dataset=tiny_data(), **kwargs)


def test_sparse_trainer_resume_refuses_foreign_checkpoints_and_wrong_base(tmp_path):
    model = tiny_model()
    mask = random_mask(model)
    args = arguments(tmp_path, save_strategy="steps", save_steps=1, max_steps=1)
    SparseTrainer(model=model, args=args, train_dataset=tiny_data(), mask=mask).train()
    checkpoint = tmp_path / "checkpoint-1"
    assert (checkpoint / DELTA_FILE).is_file() and (checkpoint / MASK_FILE).is_file()

    longer = arguments(tmp_path, max_steps=2)
    tuned = model  # already holds the checkpoint's weights: not the base
    with pytest.raises(st.BaseModelMismatchError, match="not the base model"):
        SparseTrainer(model=tuned, args=longer, train_dataset=tiny_data(), mask=mask).train(
            resume_from_checkpoint=str(checkpoint))
    with pytest.raises(st.StateMismatchError, match="another mask"):
        SparseTrainer(model=tiny_model(), args=longer, train_dataset=tiny_data(),
                      mask=random_mask(model, seed=5)).train(resume_from_checkpoint=True)
    (checkpoint / MASK_FILE).unlink()
    with pytest.raises(st.StateMismatchError, match="not saved by SparseTrainer"):
        SparseTrainer(model=tiny_model(), args=longer, train_dataset=tiny_data(),
                      method="sam", density=0.1).train(resume_from_checkpoint=str(checkpoint))


def test_sparse_trainer_resume_restores_mask_and_state_exactly(tmp_path):
    """A SAM-selected run resumed from checkpoint-2 ends bit-identical to an uninterrupted one."""

    def run(resume=None):
        model = tiny_model()
        args = arguments(tmp_path, max_steps=3, save_strategy="steps", save_steps=2,
                         lr_scheduler_type="linear")
        trainer = SparseTrainer(model=model, args=args, train_dataset=tiny_data(), method="sam",
                                density=0.02, always_train=HEAD, selection_batches=2,
                                selection_options={"progress": False})
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    whole, first = run()
    assert first.select_mask() != first.sparse_mask  # on tuned weights: resume must not select
    resumed, second = run(str(tmp_path / "checkpoint-2"))
    assert second.sparse_mask == first.sparse_mask
    assert same_weights(whole, resumed)
    inner_a, inner_b = first.optimizer.optimizer, second.optimizer.optimizer
    for s, r in zip(inner_a.state.values(), inner_b.state.values(), strict=True):
        assert s["step"] == r["step"] == 3 and torch.equal(s["exp_avg_sq"], r["exp_avg_sq"])


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated")
def test_sparse_trainer_trains_exactly_the_lora_entries_of_a_peft_model(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_model(), peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"])
    )
    with torch.no_grad():  # B != 0, so that A moves from the first step
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.1)
    before = copy.deepcopy(model)
    args = arguments(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer = SparseTrainer(model=model, args=args, train_dataset=tiny_data(), method="lora")
    trainer.train()
    mask = trainer.sparse_mask
    assert mask == st.select(before, "lora")
    for (name, p), q in zip(model.named_parameters(), before.parameters(), strict=True):
        if mask[name].any():
            assert not torch.equal(p, q), name
        else:
            assert torch.equal(p, q), name
    delta = st.SparseDelta.load(tmp_path / "checkpoint-2" / DELTA_FILE)
    assert delta.num_entries == mask.num_trainable
    assert same_weights(delta.apply_to(before), model)


# -- sparse gradients and clipping over the selected entries --------------------------------------
class _Recorder(TrainerCallback):
    """Records, just before each optimizer step, how the gradients look."""

    def __init__(self, mask: st.Mask) -> None:
        self.mask = mask
        self.steps: list[dict[str, object]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        named = dict(model.named_parameters())
        self.steps.append({
            "sparse": sorted(n for n, p in named.items()
                             if p.grad is not None and p.grad.is_sparse),
            "no_grad": sorted(n for n, p in named.items() if p.grad is None),
            "frozen": sorted(n for n, p in named.items() if not p.requires_grad),
            "patched": sum("forward" in m.__dict__ for m in model.modules()),
        })


def selected_norm(model, mask) -> float:
    """Global 2-norm of the gradients at the selected entries (brute force, densified)."""
    return float(torch.sqrt(sum(
        (p.grad.to_dense()[mask[n]] ** 2).sum()
        for n, p in model.named_parameters() if p.grad is not None
    )))


def hand_written_run(mask, hyper, steps):
    """Dense gradients, SparseAdamW, opt.clip_grad_norm_ and a linear schedule, by hand.

    Returns (model, [(selected-entry norm, all-entries norm) before clipping, per step]).
    """
    model = tiny_model(config=DETERMINISTIC).double()
    model.train()
    named = list(model.named_parameters())
    no_decay = [n for n, _ in named if "bias" in n or "LayerNorm" in n]
    opt = st.SparseAdamW(
        [{"params": [(n, p) for n, p in named if n not in no_decay],
          "weight_decay": hyper["weight_decay"]},
         {"params": [(n, p) for n, p in named if n in no_decay], "weight_decay": 0.0}],
        mask, lr=hyper["learning_rate"], weight_decay=hyper["weight_decay"],
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, (steps - s) / steps))
    batch = torch.utils.data.default_collate(tiny_data(8))  # one batch = the whole data set
    norms = []
    for _ in range(steps):
        model(**batch).loss.backward()
        all_entries = float(torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters() if p.grad is not None]))
        selected = selected_norm(model, mask)
        clipped_at = opt.clip_grad_norm_(hyper["max_grad_norm"])
        assert float(clipped_at) == pytest.approx(selected, rel=1e-12)
        assert selected_norm(model, mask) == pytest.approx(hyper["max_grad_norm"], rel=1e-4)
        norms.append((float(clipped_at), all_entries))
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, norms


def test_sparse_gradients_train_like_the_dense_path_and_a_hand_written_loop(tmp_path):
    """Clipping active (max_grad_norm far below the norm): sparse gradients, the dense masked
    path and a hand-written SparseAdamW loop reach the same weights; the logged grad_norm is
    the selected-entry norm; the model is restored after train()."""
    hyper = dict(learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.02,
                 per_device_train_batch_size=8, logging_steps=1, save_strategy="steps",
                 save_steps=2)
    steps = 3
    mask = random_mask(tiny_model(config=DETERMINISTIC), density=0.05)
    runs = {}
    for sparse in (True, False):
        model = tiny_model(config=DETERMINISTIC).double()
        flags = [p.requires_grad for p in model.parameters()]
        recorder = _Recorder(mask)
        trainer = SparseTrainer(
            model=model, args=arguments(tmp_path / str(sparse), max_steps=steps, **hyper),
            train_dataset=tiny_data(8), mask=mask, sparse_gradients=sparse, callbacks=[recorder],
        )
        trainer.train()
        runs[sparse] = model, trainer, recorder
        # Restored: no replaced forward left, requires_grad flags as before.
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert [p.requires_grad for p in model.parameters()] == flags

    reference, norms = hand_written_run(mask, hyper, steps)
    base = tiny_model(config=DETERMINISTIC).double()
    for (name, p), q, r, b in zip(runs[True][0].named_parameters(), runs[False][0].parameters(),
                                  reference.parameters(), base.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)
        torch.testing.assert_close(p, r, rtol=0, atol=1e-12, msg=name)
        frozen = ~mask[name]
        for tuned in (p, q, r):
            assert torch.equal(tuned.detach()[frozen], b.detach()[frozen]), name
    assert not torch.equal(runs[True][0].classifier.weight, base.classifier.weight)

    # Compact gradients while training (dense ones on the dense path), untouched tensors
    # frozen on both paths (by prepare() and by SparseAdamW's freeze_unselected).
    partly = [n for n, row in mask.per_parameter().items()
              if 0 < row.selected < row.total and n.endswith("weight") and "LayerNorm" not in n]
    untouched = sorted(n for n, row in mask.per_parameter().items() if row.selected == 0)
    assert partly and untouched
    for record in runs[True][2].steps:
        assert record["sparse"] == sorted(partly)
        assert record["frozen"] == record["no_grad"] == untouched
        assert record["patched"] > 0
    for record in runs[False][2].steps:  # the optimizer froze the untouched tensors
        assert record["sparse"] == [] and record["frozen"] == record["no_grad"] == untouched

    for sparse in (True, False):
        logged = [e["grad_norm"] for e in runs[sparse][1].state.log_history if "grad_norm" in e]
        assert len(logged) == steps
        for value, (selected, all_entries) in zip(logged, norms):
            assert value == pytest.approx(selected, rel=1e-9)
            assert selected > 5 * hyper["max_grad_norm"]  # clipping was active
            assert all_entries > 1.1 * selected  # the old, all-entries norm is another number
    checkpoint = tmp_path / "True" / "checkpoint-2"
    assert st.Mask.load(checkpoint / MASK_FILE, model=base) == mask


def test_logged_grad_norm_is_over_the_selected_entries_without_clipping(tmp_path):
    """max_grad_norm=0: same weights as a plain Trainer with SparseAdamW, which logs the norm
    over every entry; SparseTrainer logs the norm over the selected ones."""
    mask = random_mask(tiny_model(config=DETERMINISTIC), density=0.05)
    hyper = dict(max_grad_norm=0.0, logging_steps=1, max_steps=2, per_device_train_batch_size=8,
                 lr_scheduler_type="constant")
    norms = {}

    class Norms(TrainerCallback):
        def __init__(self):
            self.selected, self.all = [], []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.selected.append(selected_norm(model, mask))
            self.all.append(float(torch.nn.utils.get_total_norm(
                [p.grad.to_dense() for p in model.parameters() if p.grad is not None])))

    models = []
    for kind in ("sparse_trainer", "plain"):
        model = tiny_model(config=DETERMINISTIC).double()
        seen = Norms()
        args = arguments(tmp_path / kind, **hyper)
        if kind == "plain":
            opt = st.SparseAdamW(model, mask, lr=args.learning_rate, weight_decay=0.0)
            trainer = Trainer(model=model, args=args, train_dataset=tiny_data(8),
                              optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1)),
                              callbacks=[seen])
        else:
            trainer = SparseTrainer(model=model, args=args, train_dataset=tiny_data(8), mask=mask,
                                    sparse_gradients=True, callbacks=[seen])
        trainer.train()
        models.append(model)
        norms[kind] = ([e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e],
                       seen)
    for p, q in zip(*(m.parameters() for m in models), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    logged, seen = norms["sparse_trainer"]
    assert logged == pytest.approx(seen.selected, rel=1e-9)
    logged_plain, seen_plain = norms["plain"]
    assert logged_plain == pytest.approx(seen_plain.all, rel=1e-9)  # the Trainer's own norm
    assert seen.selected == pytest.approx(seen_plain.selected, rel=1e-9)
    assert all(a > 1.1 * s for a, s in zip(seen_plain.all, seen.selected))


def test_sparse_gradients_are_removed_when_training_raises(tmp_path):
    class Boom(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            assert any("forward" in m.__dict__ for m in model.modules())  # prepared
            raise RuntimeError("boom")

    model = tiny_model()
    mask = random_mask(model)
    trainer = SparseTrainer(model=model, args=arguments(tmp_path, max_steps=2),
                            train_dataset=tiny_data(), mask=mask, sparse_gradients=True,
                            callbacks=[Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None or not p.grad.is_sparse for p in model.parameters())


def test_sparse_gradients_refuse_more_than_one_process(tmp_path, monkeypatch):
    model = tiny_model()
    mask = random_mask(model)
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(st.InvalidArgumentError, match=r"world_size=2.*DDP does not reduce"):
        SparseTrainer(model=model, args=arguments(tmp_path), train_dataset=tiny_data(),
                      mask=mask, sparse_gradients=True)
    SparseTrainer(model=model, args=arguments(tmp_path), train_dataset=tiny_data(), mask=mask)
    with pytest.raises(st.InvalidArgumentError, match="n_gpu=2"):
        st_transformers._check_single_process(types.SimpleNamespace(world_size=1, n_gpu=2))
    st_transformers._check_single_process(types.SimpleNamespace(world_size=1, n_gpu=1))


# -- the embedded real model --------------------------------------------------------------------
def minilm_trainer(out, task, sparse_gradients=False, **overrides):
    model, tokenizer = st_data.load_model(2)
    examples = [
        dict(tokenizer(text, truncation=True, max_length=16), labels=label)
        for text, label in zip(task.train.texts[:24], task.train.labels[:24])
    ]
    args = arguments(out, save_strategy="steps", save_steps=1, learning_rate=1e-3, **overrides)
    trainer = SparseTrainer(
        model=model, args=args, train_dataset=examples,
        data_collator=DataCollatorWithPadding(tokenizer), method="sam", density=0.001,
        always_train=st_data.HEAD_PARAMETERS, selection_batches=1,
        selection_options={"progress": False}, sparse_gradients=sparse_gradients,
    )
    return model, trainer


def test_sparse_trainer_on_minilm_trains_only_its_sam_mask(tmp_path):
    """Real Trainer, embedded MiniLM, real Rotten Tomatoes snippets: one step and a checkpoint."""
    task = st_data.load_task("rotten_tomatoes", max_examples=200)
    model, trainer = minilm_trainer(tmp_path, task, max_steps=1)
    base = copy.deepcopy(model)
    trainer.train()
    mask = trainer.sparse_mask
    assert mask.num_selected == st.budget_size(mask.num_total, 0.001)
    moved = 0
    for name, p in model.named_parameters():
        frozen = ~mask[name]
        assert torch.equal(p.detach()[frozen], base.get_parameter(name).detach()[frozen]), name
        moved += int((p.detach() != base.get_parameter(name).detach()).sum())
    assert moved > 0.9 * mask.num_trainable

    folder = tmp_path / "checkpoint-1"
    assert st.Mask.load(folder / MASK_FILE, model=base) == mask
    assert same_weights(st.SparseDelta.load(folder / DELTA_FILE).apply_to(base), model)
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    decay = set(trainer.get_decay_parameter_names(model))
    named = list(model.named_parameters())
    fresh = st.SparseAdamW([{"params": [(n, p) for n, p in named if n in decay]},
                            {"params": [(n, p) for n, p in named if n not in decay]}], mask)
    fresh.load_state_dict(state)
    assert sum(s["exp_avg"].numel() for s in fresh.state.values()) == mask.num_trainable


@pytest.mark.slow
def test_sparse_trainer_on_minilm_resumes_exactly(tmp_path):
    task = st_data.load_task("rotten_tomatoes", max_examples=200)
    whole, first = minilm_trainer(tmp_path, task, max_steps=2)
    first.train()
    resumed, second = minilm_trainer(tmp_path, task, max_steps=2)
    second.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert second.sparse_mask == first.sparse_mask  # read back, not selected again
    assert same_weights(resumed, whole)


@pytest.mark.slow
def test_sparse_trainer_on_minilm_with_sparse_gradients_matches_the_dense_path(tmp_path):
    task = st_data.load_task("rotten_tomatoes", max_examples=200)
    dense, first = minilm_trainer(tmp_path / "dense", task, max_steps=2, max_grad_norm=0.5,
                                  logging_steps=1)
    base = copy.deepcopy(dense)
    first.train()
    sparse, second = minilm_trainer(tmp_path / "sparse", task, sparse_gradients=True, max_steps=2,
                                    max_grad_norm=0.5, logging_steps=1)
    second.train()
    mask = first.sparse_mask
    assert second.sparse_mask == mask
    for (name, p), q, b in zip(sparse.named_parameters(), dense.parameters(), base.parameters(),
                               strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(p.detach()[~mask[name]], b.detach()[~mask[name]]), name
        assert p.requires_grad
    assert not any("forward" in m.__dict__ for m in sparse.modules())
    logs = [[e["grad_norm"] for e in t.state.log_history if "grad_norm" in e]
            for t in (first, second)]
    assert logs[0] == pytest.approx(logs[1], rel=1e-4)
    assert min(logs[0]) > 0.5  # clipping was active
