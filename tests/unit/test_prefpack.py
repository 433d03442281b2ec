"""Packed preference batches score every sequence exactly as the padded batch does: the same
per-token log-probs, the same DPO loss, the same gradients, and no sequence predicts from its
neighbour's last token."""

from __future__ import annotations

import copy

import pytest
import torch

from hfhpc.recipes import attention, prefpack


def _model(impl: str):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        pad_token_id=0, attn_implementation=impl)
    return MistralForCausalLM(cfg)


def _fused(model, packed: bool):
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    if packed:
        model.forward = prefpack.pack_forward(model.forward)
    return model


def _batch(pairs):
    """TRL's own collator over (prompt, chosen, rejected) lengths: [chosen; rejected], right-padded."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    g = torch.Generator().manual_seed(2)
    ids = lambda n: torch.randint(3, 97, (n,), generator=g).tolist()  # noqa: E731
    rows = [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in pairs]
    return DataCollatorForPreference(pad_token_id=0)(rows)


PAIRS = [(5, 3, 9), (1, 12, 2), (7, 1, 1), (3, 6, 6)]  # uneven: padding in most rows, one full row


def _log_probs(model, batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                 use_cache=False, fused_lm_head=True)


def test_pack_keeps_each_sequences_last_token_from_predicting_the_next_sequence():
    ids = torch.tensor([[11, 12, 13, 0], [21, 22, 0, 0]])
    mask = (ids != 0).long()
    row = prefpack.pack(ids, mask, ids.masked_fill(mask == 0, -100))
    assert row["input_ids"].tolist() == [[11, 12, 13, 21, 22]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert row["shift_labels"].tolist() == [[12, 13, -100, 22, -100]]  # 13 does not predict 21
    assert row["cu_seq_lens_q"].tolist() == [0, 3, 5] and row["max_length_q"] == 2 + 1
    back = prefpack.unpack(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]]), mask.bool())
    assert back.tolist() == [[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]  # (rows, length - 1), as the padded forward


def test_packed_forward_gives_the_padded_per_token_log_probs_and_gradients():
    attention.register()
    padded = _fused(_model("sdpa"), packed=False)
    packed = _fused(copy.deepcopy(_model(attention.NAME)), packed=True)
    packed.load_state_dict(padded.state_dict())
    batch = _batch(PAIRS)
    a, b = _log_probs(padded, batch), _log_probs(packed, batch)
    assert b.log_probs.shape == a.log_probs.shape == (8, batch["input_ids"].shape[1] - 1)
    for field in ("log_probs", "entropy", "mean_logits", "is_top1", "label_mask"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), rtol=1e-5, atol=1e-5, msg=field)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-5, atol=1e-6)
    # Sequence sums weighted unevenly, so each row's gradient counts.
    w = torch.arange(1.0, 9.0)
    (a.log_probs.sum(1) * w).sum().backward()
    (b.log_probs.sum(1) * w).sum().backward()
    for (name, p), q in zip(padded.named_parameters(), packed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_calls_that_are_not_right_padded_fused_batches_run_unchanged():
    attention.register()
    model = _fused(_model(attention.NAME), packed=True)
    batch = _batch(PAIRS[:2])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert logits.shape[:2] == batch["input_ids"].shape  # not fused: the model's own forward
        left = batch["attention_mask"].flip(1)
        out = model(input_ids=batch["input_ids"], attention_mask=left, labels=batch["input_ids"].masked_fill(left == 0, -100),
                    fused_lm_head=True)
        assert out.log_probs.shape == (4, batch["input_ids"].shape[1] - 1)


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory):
    from hfhpc.demo import build

    return build.build_tiny_chat_model(tmp_path_factory.mktemp("model"))


def _trainer(model_dir, tmp_path, packed: bool, compiled: bool = False, **config):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from hfhpc.recipes.dpo import trainer_class

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    g = torch.Generator().manual_seed(4)
    ids = lambda n: torch.randint(5, len(tok) - 1, (n,), generator=g).tolist()  # noqa: E731
    rows = [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in PAIRS * 2]
    attn = attention.register(64) if packed else "sdpa"
    load = lambda: AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)  # noqa: E731
    args = DPOConfig(output_dir=str(tmp_path / ("packed" if packed else "padded")), use_cpu=True, report_to="none",
                     per_device_train_batch_size=4, max_length=64, **config)
    ref = None if config.get("precompute_ref_log_probs") else load().eval()
    policy = load()
    torch.manual_seed(5)
    with torch.no_grad():  # a policy that has moved from the reference: rewards well above rounding
        for p in policy.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    if compiled:  # as the recipe does on GPUs: every decoder layer compiled, the policy's checkpointed
        from hfhpc.recipes.layers import prepare_layers

        prepare_layers(policy, checkpoint=True, keep=1, compile=True, backend="aot_eager")
        if ref is not None:
            prepare_layers(ref, checkpoint=False, compile=True, backend="aot_eager")
    trainer = trainer_class()(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tok)
    if packed:
        assert prefpack.install(trainer) == (["policy", "reference"] if ref is not None else ["policy"])
    return trainer


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-layers"])
def test_dpo_loss_metrics_and_gradients_are_those_of_the_padded_batch(tiny_chat, tmp_path, compiled):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    results = []
    for packed in (False, True):
        trainer = _trainer(tiny_chat, tmp_path, packed, compiled=compiled and packed)
        batch = DataCollatorForPreference(pad_token_id=trainer.processing_class.pad_token_id)(
            [trainer.train_dataset[i] for i in range(4)])
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, grads))
    (la, ma, ga), (lb, mb, gb) = results
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    assert ma.keys() == mb.keys() and "logps/chosen" in ma
    assert abs(ma["rewards/margins"]) > 1e-2
    for k in ma:
        assert mb[k] == pytest.approx(ma[k], rel=1e-4, abs=1e-4), k
    assert ga.keys() == gb.keys() and len(ga) > 10
    for k in ga:
        err = float((gb[k] - ga[k]).norm() / ga[k].norm().clamp(min=1e-12))
        assert err < 5e-4, (k, err)  # fp32 rounding of log-prob sums over ~30 tokens, through the sigmoid
