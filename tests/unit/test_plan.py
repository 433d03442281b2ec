"""``hfhpc plan``: the memory model against hand arithmetic and GPU measurements, tokens per epoch
from the store, the schedule, the CLI's JSON, and no torch on the login-node path."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from hfhpc.plan import (
    GIB,
    GPUS,
    SHAPE_1B,
    SHAPE_7B,
    ModelShape,
    PlanInputs,
    estimate_memory,
    load_result_anchors,
    make_plan,
    tokens_from_lengths,
)
from hfhpc.spec import load_spec

# A 2-layer decoder small enough to do by hand: h=256, i=512, 4 heads and 2 kv heads of 64, V=1000.
SMALL_CONFIG = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1000,
                "tie_word_embeddings": False}
SMALL = ModelShape.from_config(SMALL_CONFIG)
# Embeddings and head: 1000·256 each, untied = 512,000.
# A layer: q 256·256 = 65,536; k, v 256·128 = 32,768 each; o 65,536; gate, up, down 256·512 = 131,072 each;
# 2 norms of 256: 65,536 + 65,536 + 65,536 + 393,216 + 512 = 590,336.
LAYER = 590_336
N = 512_000 + 2 * LAYER + 256  # + the final norm = 1,692,928
# micro-batch 2 × 128 tokens
T = 256
# Activations of one layer per token in bf16 (c = 2, a·d = h = 256, kv·d = 128, no repeat_kv):
# norms 2·4h + 2·2h = 3,072; linear inputs 2h + 2h + 2i = 2,048; SDPA q, out 2·2·256 + k, v 2·2·128 = 1,536;
# SwiGLU 3·2·512 = 3,072: 9,728 bytes = 16h + 4·a·d + 4·kv·d + 8i.
ACT_TOKEN = 9_728
FINAL = (4 + 2 * 2) * 256 * T  # final norm + head input: 524,288
# TRL's chunked head: a 256×1000 bf16 tile + fp32 head gradient 4·1000·256 + fp32 input gradient 4·T·256.
HEAD = 2 * 256 * 1000 + 4 * 1000 * 256 + 4 * T * 256  # 1,798,144
WORKSPACE = (2 * 2 * 256 + 3 * 2 * 512) * T  # 1,048,576


def small(**kw) -> PlanInputs:
    base = dict(shape=SMALL, micro_batch=2, seq_len=128, padding_free=False, fused_lm_head=True,
                optim="adamw_torch_fused", activation_checkpointing=False)
    return PlanInputs(**{**base, **kw})


def phases(p: PlanInputs) -> dict[str, float]:
    return {ph.name: ph.bytes for ph in estimate_memory(p).phases}


def test_parameter_count_by_hand():
    assert SMALL.layer_params == LAYER
    assert SMALL.params == N == 1_692_928
    # The 7.24B Zephyr/Mistral shape and the 1.1B one of the seed bench.
    assert SHAPE_7B.params == 7_241_732_096
    assert SHAPE_1B.params == 1_100_048_384  # what torch counted on the GPU machine


def test_ddp_on_4_gpus_replicates_bf16_states_and_adds_buckets():
    p = small(strategy="ddp", gpus_per_node=4)  # weights loaded in bf16 by the recipe: m = 2
    got = phases(p)
    # states 2N params + 4N AdamW (bf16 moments) + 2N DDP buckets; activations L·9,728·T; the head.
    loss = 2 * N + 4 * N + 2 * N + 2 * ACT_TOKEN * T + FINAL + HEAD
    assert got["loss (end of forward)"] == loss == 20_846_592
    # backward through layer 0: + 2N gradients, one layer's activations, the workspace
    assert got["backward (first layer)"] == 10 * N + ACT_TOKEN * T + WORKSPACE == 20_468_224
    assert got["optimizer step"] == 10 * N  # fused AdamW: no temporaries
    assert estimate_memory(p).peak_gib == pytest.approx(20_846_592 / GIB)


def test_fsdp_on_4_gpus_shards_fp32_states():
    p = small(strategy="fsdp", gpus_per_node=4)
    got = phases(p)
    root = 2 * (512_000 + 256)  # embeddings + head + final norm gathered in bf16: 1,024,512
    # fp32 master shards: params 4N/4 = N, AdamW 8N/4 = 2N; two layers gathered in bf16 in forward.
    loss = N + 2 * N + root + 2 * 2 * LAYER + 2 * ACT_TOKEN * T + FINAL + HEAD
    assert got["loss (end of forward)"] == loss == 15_767_808
    # backward: + gradients N; three layer-sized bf16 buffers
    assert got["backward (first layer)"] == 4 * N + root + 3 * 2 * LAYER + ACT_TOKEN * T + WORKSPACE == 14_877_184
    assert got["optimizer step"] == 4 * N
    # the foreach AdamW adds sqrt(v), one more fp32 shard: N
    assert phases(replace(p, optim="adamw_torch"))["optimizer step"] == 5 * N


def test_fsdp_with_activation_checkpointing_keeps_layer_inputs_only():
    p = small(strategy="fsdp", gpus_per_node=4, activation_checkpointing=True)
    got = phases(p)
    root = 1_024_512
    saved = 2 * 2 * 256 * T  # L layers × 2h bytes × T: 262,144
    assert got["loss (end of forward)"] == 3 * N + root + 2 * 2 * LAYER + saved + FINAL + HEAD == 11_049_216
    # backward recomputes one layer and holds its checkpointed input (2h·T): now the peak
    bwd = 4 * N + root + 3 * 2 * LAYER + ACT_TOKEN * T + 2 * 256 * T + WORKSPACE
    assert got["backward (first layer)"] == bwd == 15_008_256
    assert estimate_memory(p).peak.name == "backward (first layer)"


def test_lora_trains_r_times_in_plus_out_per_adapted_linear():
    p = small(lora_rank=8)
    # r·(in+out): q 8·512, k 8·384, v 8·384, o 8·512, gate 8·768, up 8·768, down 8·768 = 32,768 per layer
    assert p.lora_params_per_layer() == 32_768
    assert p.trainable_params == 65_536
    got = phases(p)
    params = 2 * N + 4 * 65_536  # frozen bf16 base + fp32 adapters
    optimizer = 8 * 65_536  # fp32 AdamW moments of the adapters
    # per token: fp32 norm inputs 8h = 2,048 (frozen norm weights keep nothing else);
    # adapter input copies 2·(3·256 + 256 + 2·256 + 512) + 7·2·8 = 4,208; SDPA 1,536; SwiGLU 3,072
    act_token = 2_048 + 4_208 + 1_536 + 3_072
    assert got["loss (end of forward)"] == params + optimizer + 2 * act_token * T + FINAL + HEAD == 12_057_088
    assert got["optimizer step"] == params + 4 * 65_536 + optimizer


def test_lora_under_fsdp2_shards_the_frozen_base_as_loaded_and_only_adapters_take_gradients():
    def states(version: int) -> dict[str, float]:
        p = small(lora_rank=8, strategy="fsdp", gpus_per_node=2, fsdp_version=version)
        return {t.name: t.bytes for t in estimate_memory(p).phases[-1].terms}

    two, one = states(2), states(1)
    assert two["parameters"] == (2 * N + 4 * 65_536) / 2  # bf16 base + fp32 adapters, halved
    assert two["gradients"] == 4 * 65_536 / 2
    # FSDP1's flat parameters upcast and give a gradient to each wrapped layer as a whole.
    assert one["parameters"] > two["parameters"] and one["gradients"] == 4 * 2 * (LAYER + 32_768) / 2


def test_full_logits_without_trls_fused_head_cost_12_bytes_per_logit():
    with_head = phases(small())["loss (end of forward)"]
    without = phases(small(fused_lm_head=False))["loss (end of forward)"]
    assert without - with_head == 12 * T * 1000 - HEAD


def test_zephyr_7b_fsdp_2xh100_within_15_percent_of_the_measured_67_5_gib(tmp_path: Path):
    """NOTES.md: 7.24B Mistral shape, FSDP full shard, 2×H100, micro-batch 8 × 2048, activation
    checkpointing, TRL with bfd packing, optim adamw_torch: torch.cuda.max_memory_allocated 67.5 GiB."""
    spec, config = _zephyr_files(tmp_path, optim="adamw_torch")
    plan = make_plan(load_spec(spec), tmp_path / "store", model_config=config, gpu="h100", results_dir=tmp_path)
    assert plan.inputs.shape == SHAPE_7B
    assert abs(plan.memory.peak_gib - 67.5) / 67.5 < 0.15
    assert plan.memory.peak_gib == pytest.approx(67.5, abs=0.5)  # in fact: 20·N/2 bytes = 67.44 GiB
    assert plan.memory.peak.name == "optimizer step"
    assert plan.fits and plan.memory.reserved_gib < GPUS["h100"].memory_gib
    assert any("67.5 GiB" in m for m in plan.measured)


# Peaks of a training step (forward with autocast, backward, clip, AdamW) measured with
# torch.cuda.max_memory_allocated on one H100 80GB HBM3 (torch 2.11, transformers 5.17, sdpa,
# transformers' own loss, i.e. full logits): (shape, layers, fp32 weights under autocast?,
# checkpointing, micro-batch, foreach AdamW?, GiB).
H100_PEAKS = [
    ("1b", 2, True, False, 4, True, 7.53), ("1b", 4, True, False, 4, True, 10.32),
    ("1b", 2, True, True, 4, True, 5.85), ("1b", 4, True, True, 4, True, 6.96),
    ("1b", 2, False, False, 4, True, 5.67), ("1b", 4, False, False, 4, True, 7.50),
    ("1b", 2, False, True, 4, True, 4.41), ("1b", 4, False, True, 4, True, 4.96),
    ("7b", 1, False, False, 2, True, 5.10), ("7b", 2, False, False, 2, True, 7.09),
    ("7b", 1, False, True, 2, True, 4.54), ("7b", 2, False, True, 2, True, 6.57),
    ("1b", 22, True, False, 8, True, 56.60), ("1b", 22, True, True, 8, True, 22.35),
    ("1b", 22, True, True, 8, False, 22.36),
]


@pytest.mark.parametrize("shape, layers, fp32, ckpt, batch, foreach, measured", H100_PEAKS)
def test_single_gpu_peaks_match_h100_measurements(shape, layers, fp32, ckpt, batch, foreach, measured):
    base = SHAPE_1B if shape == "1b" else SHAPE_7B
    p = PlanInputs(shape=replace(base, layers=layers), micro_batch=batch, seq_len=2048, activation_checkpointing=ckpt,
                   weights_dtype="fp32" if fp32 else "bf16", optim="adamw_torch" if foreach else "adamw_torch_fused",
                   fused_lm_head=False, padding_free=False)
    assert estimate_memory(p).peak_gib == pytest.approx(measured, rel=0.10)


def test_the_1b_no_checkpointing_anchor_with_trl():
    """NOTES.md: 1.1B shape, one H100, wrapped packing, no checkpointing (fp32 weights under autocast,
    TRL's fused head, adamw_torch): 51.6 GiB."""
    p = PlanInputs(shape=SHAPE_1B, micro_batch=8, seq_len=2048, activation_checkpointing=False, weights_dtype="fp32",
                   optim="adamw_torch", fused_lm_head=True, padding_free=False)
    assert estimate_memory(p).peak_gib == pytest.approx(51.6, rel=0.05)


def test_tokens_from_lengths_under_each_packing():
    lengths = [100, 300, 50, 600]
    bfd = tokens_from_lengths(lengths, seq_len=256, packing=True, packing_strategy="bfd", micro_batch=2,
                              source="t", exact=True)
    assert bfd.tokens == 100 + 256 + 50 + 256 and bfd.sequences == math.ceil(662 / 256)  # truncated, then binned
    wrapped = tokens_from_lengths(lengths, seq_len=256, packing=True, packing_strategy="wrapped", micro_batch=2,
                                  source="t", exact=True)
    assert wrapped.tokens == 1050 and wrapped.sequences == 5
    # A 2-row sample standing for 1,000 rows scales linearly.
    est = tokens_from_lengths([100, 300], rows=1000, seq_len=256, packing=True, packing_strategy="bfd",
                              micro_batch=2, source="t", exact=False)
    assert est.tokens == (100 + 256) * 500 and est.rows == 1000
    unpacked = tokens_from_lengths([10, 20, 30, 40], seq_len=256, packing=False, packing_strategy="bfd",
                                   micro_batch=4, source="t", exact=True)
    assert unpacked.sequences == 4 and unpacked.padded_tokens == 4 * 40  # one batch padded to its longest row


# -- through the store and the CLI ---------------------------------------------------------------

MODEL_COMMIT = "1" * 40
DATASET_COMMIT = "2" * 40
TEMPLATE = ("{{ bos_token + ' ' }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' }}"
            "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + ' ' + eos_token }}{% endgeneration %}"
            "{% else %}{{ m['content'] + ' ' + eos_token }}{% endif %}{{ '\n' }}{% endfor %}")


def _zephyr_files(folder: Path, **train) -> tuple[Path, Path]:
    config = folder / "config.json"
    config.write_text(json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
                                  "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                                  "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False}))
    extra = "".join(f", {k}: {v}" for k, v in train.items())
    spec = folder / "zephyr.yaml"
    spec.write_text(f"""\
name: zephyr-sft
recipe: sft
model: HuggingFaceH4/zephyr-7b-beta
dataset: {{id: HuggingFaceH4/ultrachat_200k, split: train_sft}}
train: {{max_length: 2048, per_device_batch_size: 8{extra}}}
launch: {{strategy: fsdp, mixed_precision: bf16, activation_checkpointing: true}}
resources: {{nodes: 1, gpus_per_node: 2, time: "0-03:00:00"}}
""")
    return spec, config


def _tokenizer_json(path: Path) -> None:
    """A word-level tokenizer: every whitespace-separated word is one token."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    words = ["<s>", "</s>", "<|user|>", "<|assistant|>", "hello", "there", "how", "are", "you", "fine", "<unk>"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


@pytest.fixture
def staged(tmp_path: Path) -> tuple[Path, Path]:
    """A spec, its lockfile and a store with the model's files and the dataset's Arrow cache."""
    store = tmp_path / "store"
    snap = store / "hub" / "models--org--tiny" / "snapshots" / MODEL_COMMIT
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(SMALL_CONFIG))
    (snap / "chat_template.jinja").write_text(TEMPLATE)
    (snap / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    _tokenizer_json(snap / "tokenizer.json")
    spec = tmp_path / "job.yaml"
    spec.write_text("""\
name: tiny
recipe: sft
model: org/tiny
dataset: {id: org/chat, split: train_sft}
train: {max_length: 64, per_device_batch_size: 2, epochs: 2}
launch: {strategy: ddp, mixed_precision: bf16}
resources: {nodes: 1, gpus_per_node: 2, time: "0-01:00:00"}
""")
    lock = {"version": 1, "assets": [
        {"kind": "model", "id": "org/tiny", "revision": "main", "commit": MODEL_COMMIT, "files": []},
        {"kind": "dataset", "id": "org/chat", "revision": "main", "commit": DATASET_COMMIT, "files": []}]}
    spec.with_suffix(".lock").write_text(json.dumps(lock))
    # The datasets library's Arrow cache of the split: 300 identical conversations.
    import pyarrow as pa

    cache = store / "datasets" / "org___chat" / "default" / "0.0.0" / DATASET_COMMIT
    cache.mkdir(parents=True)
    convo = [{"role": "user", "content": "hello there how are you"}, {"role": "assistant", "content": "fine"}]
    table = pa.table({"messages": [convo] * 300})
    with pa.OSFile(str(cache / "chat-train_sft.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (cache / "dataset_info.json").write_text(json.dumps({"splits": {"train_sft": {"name": "train_sft", "num_examples": 300}}}))
    return spec, store


# "<s> <|user|>\n hello there how are you </s>\n <|assistant|>\n fine </s>\n": 11 word tokens per row.
ROW_TOKENS = 11


def test_tokens_per_epoch_from_a_sample_of_the_staged_dataset(staged):
    spec, store = staged
    plan = make_plan(load_spec(spec), store)
    assert plan.data is not None and not plan.data.exact
    assert plan.data.rows == 300 and plan.data.tokens == 300 * ROW_TOKENS
    assert "200-row sample (tokenizer.json)" in plan.data.source


def test_tokens_per_epoch_from_the_prepared_dataset_are_exact(staged):
    import datasets

    from hfhpc.recipes.chatdata import cache_key

    spec, store = staged
    key = cache_key(dataset_id="org/chat", commit=DATASET_COMMIT, config=None, split="train_sft",
                    tokenizer_commit=MODEL_COMMIT, template=TEMPLATE, assistant_only=True, max_samples=None)
    lengths = [10, 70, 30] * 50  # 150 rows; bfd truncates the 70s to 64
    datasets.Dataset.from_dict({"input_ids": [[1] * n for n in lengths]}).save_to_disk(str(store / "hfhpc" / "prepared" / key))
    plan = make_plan(load_spec(spec), store)
    assert plan.data is not None and plan.data.exact
    tokens = (10 + 64 + 30) * 50
    assert plan.data.tokens == tokens == 5_200
    # 82 packed sequences of 64; 2 epochs; global batch 2 × 2 GPUs = 4 sequences per step
    assert plan.data.sequences == math.ceil(tokens / 64) == 82
    s = plan.schedule
    assert s is not None and s.steps == 2 * math.ceil(82 / 4) == 42
    assert s.step_s == pytest.approx(2 * 64 / plan.throughput.tokens_per_s_per_gpu)
    assert s.total_s == pytest.approx(s.startup_s + s.train_s + s.saves * s.save_s)
    assert plan.est_hours == pytest.approx(s.total_s / 3600)


def test_unknown_tokens_when_nothing_is_staged(tmp_path: Path):
    spec, config = _zephyr_files(tmp_path)
    plan = make_plan(load_spec(spec), tmp_path / "store", model_config=config)
    assert plan.data is None and "not staged" in plan.data_note
    assert plan.schedule is None and plan.est_hours is None


def test_schedule_counts_requeues_against_the_spec_time(tmp_path: Path):
    spec, config = _zephyr_files(tmp_path, max_steps=50000)
    plan = make_plan(load_spec(spec), tmp_path / "store", model_config=config, results_dir=tmp_path)
    s = plan.schedule
    assert s is not None and s.steps == 50000
    # The built-in anchor for exactly this layout (hfhpc's recipe, 2×H200, whose bf16 peak is the
    # H100's): 9,089 tokens/s per GPU, so 8 × 2048 / 9,089 s a step.
    assert s.step_s == pytest.approx(8 * 2048 / 9089, rel=1e-3)
    usable = 3 * 3600 - s.startup_s - max(300, s.save_s)  # the sbatch script's SIGUSR1 comes 300 s early
    assert s.spec_allocations == math.ceil((s.train_s + s.saves * s.save_s) / usable)
    # About 25 hours: more than the longest suggested limit (24 h), so that one is suggested, with requeues.
    assert 24 * 3600 < s.total_s < 30 * 3600
    assert s.time_limit == "1-00:00:00"
    assert s.allocations == math.ceil((s.train_s + s.saves * s.save_s) / (24 * 3600 - s.startup_s - 300)) == 2


def test_a_spec_that_does_not_fit_gets_a_layout_that_does(tmp_path: Path):
    spec, config = _zephyr_files(tmp_path)
    spec.write_text(spec.read_text().replace("strategy: fsdp", "strategy: ddp"))
    # DDP keeps 8 bytes per parameter of bf16 states on every GPU: 54 GiB for 7.24B.
    plan = make_plan(load_spec(spec), tmp_path / "store", model_config=config, gpu="a100-40")
    assert not plan.fits and plan.min_gpus is None
    assert "use launch.strategy fsdp on 4 GPUs" in plan.suggestion
    # Without checkpointing, 32 layers of activations (110 GB at 8 × 2048) fit no layout: FSDP shards no activations.
    spec.write_text(spec.read_text().replace("activation_checkpointing: true", "activation_checkpointing: false"))
    plan = make_plan(load_spec(spec), tmp_path / "store", model_config=config, gpu="a100-40")
    assert "enable activation checkpointing" in plan.suggestion


HEAVY = ("torch", "transformers", "trl", "accelerate", "datasets", "evaluate", "peft")


def _plan_cli(*args: str) -> subprocess.CompletedProcess:
    """The real CLI in a fresh process that reports, on stderr, which ML libraries it imported."""
    code = ("import sys; from hfhpc.cli.main import main; rc = main(sys.argv[1:]); "
            f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_cli_json_keys_and_no_torch(staged):
    spec, store = staged
    out = _plan_cli("--store", str(store), "plan", str(spec), "--json", "--gpu", "a100-80")
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stderr  # torch above all: plan runs on login nodes
    data = json.loads(out.stdout)
    for key in ("peak_gib_per_gpu", "tokens_per_epoch", "est_hours", "breakdown", "phases", "reserved_gib_per_gpu",
                "suggested", "fits"):
        assert key in data
    assert data["tokens_per_epoch"] == 300 * ROW_TOKENS
    assert data["gpu"]["name"] == "a100-80"
    assert sum(data["breakdown"].values()) == pytest.approx(data["peak_gib_per_gpu"], abs=0.01)
    assert {"time", "save_steps", "requeues", "gpus"} <= set(data["suggested"])


def test_cli_text_and_errors(tmp_path: Path):
    spec, config = _zephyr_files(tmp_path, optim="adamw_torch")
    out = _plan_cli("--store", str(tmp_path / "store"), "plan", str(spec), "--model-config", str(config))
    assert out.returncode == 0, out.stderr
    assert "67.44" in out.stdout and "optimizer step" in out.stdout and "fits" in out.stdout
    missing = _plan_cli("--store", str(tmp_path / "store"), "plan", str(spec))
    assert missing.returncode == 1
    assert "is not staged" in missing.stderr and "--model-config" in missing.stderr


def test_gpu_results_in_benchmarks_supersede_the_built_in_anchors(tmp_path: Path):
    spec, config = _zephyr_files(tmp_path, max_steps=100)
    results = tmp_path / "results"
    results.mkdir()
    # What benchmarks/bench_sft.py writes: a newer measurement of the built-in 7.24B layout.
    (results / "sft_7b_w2.json").write_text(json.dumps({"benchmark": "sft_7b", "runs": [{
        "recipe": "hfhpc", "shape": "7b", "activation_checkpointing": True, "world": 2, "bs": 8, "seq": 2048,
        "tokens_per_s_per_gpu": 4000.0, "peak_mem_gib": 60.0, "gpu": "NVIDIA H100 80GB HBM3"}]}))
    (results / "cli_latency.json").write_text(json.dumps({"benchmark": "cli_latency", "help_s_median": 0.08}))
    plan = make_plan(load_spec(spec), tmp_path / "store", model_config=config, results_dir=results)
    assert plan.throughput is not None and plan.throughput.tokens_per_s_per_gpu == pytest.approx(4000.0)
    assert any("sft_7b_w2.json" in a for a in plan.throughput.anchors)
    assert any("60.0 GiB" in m and "sft_7b_w2.json" in m for m in plan.measured)
    # On another card the measured MFU carries over, scaled by the peak FLOPs.
    a100 = make_plan(load_spec(spec), tmp_path / "store", model_config=config, results_dir=results, gpu="a100-80")
    assert a100.throughput.tokens_per_s_per_gpu == pytest.approx(4000.0 * 312 / 989)


def test_kept_activations_cost_memory_between_full_and_no_checkpointing():
    base = dict(shape=SHAPE_7B, strategy="fsdp", gpus_per_node=2, micro_batch=8, seq_len=2048, weights_dtype="fp32")
    ckpt = estimate_memory(PlanInputs(**base)).peak_gib
    kept = estimate_memory(PlanInputs(**base, kept_layers=6)).peak_gib
    none = estimate_memory(PlanInputs(**base, activation_checkpointing=False)).peak_gib
    assert ckpt < kept < none


def test_plan_suggests_keeping_activations_where_memory_allows(tmp_path: Path):
    spec, config = _zephyr_files(tmp_path)
    plan = make_plan(load_spec(spec), tmp_path / "store", model_config=config, results_dir=tmp_path)
    assert plan.keep_activations and 0 < plan.keep_activations < 32
    kept = replace(plan.inputs, kept_layers=plan.keep_activations)
    assert estimate_memory(kept).reserved_gib <= 0.9 * GPUS["h100"].memory_gib
    assert estimate_memory(replace(kept, kept_layers=plan.keep_activations + 1)).reserved_gib > 0.9 * GPUS["h100"].memory_gib
    assert plan.to_json()["suggested"]["keep_activations"] == plan.keep_activations
    # FSDP1 (the recipe then leaves checkpointing to accelerate, every layer): nothing to suggest.
    spec.write_text(spec.read_text().replace("activation_checkpointing: true", "activation_checkpointing: true, fsdp_version: 1"))
    assert make_plan(load_spec(spec), tmp_path / "store", model_config=config, results_dir=tmp_path).keep_activations is None


def test_the_package_ships_every_measured_result_of_benchmarks(tmp_path: Path):
    """An installed hfhpc has no benchmarks/ folder: plan reads the copy in the package, which must
    hold exactly the results that make anchors (benchmarks/ship_results.py refreshes it)."""
    from hfhpc.plan.throughput import MEASURED_FILE, write_measured

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    fresh = write_measured(results, tmp_path / "measured.json")
    assert json.loads(fresh.read_text()) == json.loads(MEASURED_FILE.read_text()), \
        "src/hfhpc/plan/measured.json is behind benchmarks/results: run python benchmarks/ship_results.py"
    shipped = {a.source for a in load_result_anchors(None)}
    assert "benchmarks/results/sft_7b_4xh200.json" in shipped


def test_a_cpu_spec_is_planned_as_cpu_ranks_with_its_real_size(tmp_path: Path):
    """gpus_per_node: 0 runs gloo ranks: no GPU throughput or wall time is invented for it, and a tiny
    model is described in millions of parameters, not as 0.00B."""
    spec, config = _zephyr_files(tmp_path, max_steps=100)
    text = spec.read_text().replace("gpus_per_node: 2", "gpus_per_node: 0, procs_per_node: 2").replace("strategy: fsdp", "strategy: ddp")
    spec.write_text(text)
    config.write_text(json.dumps(SMALL_CONFIG))
    plan = make_plan(load_spec(spec), tmp_path / "store", model_config=config, results_dir=tmp_path)
    assert plan.throughput is None and plan.schedule is None
    assert any("CPU ranks" in n for n in plan.notes)
    from hfhpc.plan import render_plan

    text = render_plan(plan)
    assert "1.69M parameters" in text and "tokens/s" not in text


@pytest.mark.parametrize("train,expected", [
    ({"max_steps": 3}, "compile: staying eager: ~"),
    ({"max_steps": 5000}, "compile: compiling the decoder layers: ~"),
    ({"max_steps": 5000, "torch_compile": "false"}, "compile: staying eager: train.torch_compile is false"),
])
def test_plan_says_whether_compiling_pays_for_the_job(tmp_path: Path, train: dict, expected: str):
    from hfhpc.plan.render import render_plan

    spec, config = _zephyr_files(tmp_path, **train)
    plan = make_plan(load_spec(spec), tmp_path / "store", model_config=config, results_dir=tmp_path)
    notes = [n for n in plan.notes if n.startswith("compile:")]
    assert len(notes) == 1 and notes[0].startswith(expected), plan.notes
    assert "with the kernels of an earlier job in the store it pays after ~" in notes[0]
    assert notes[0] in render_plan(plan)
