"""SFT data preparation: hfhpc's prepared-data path against the page's approach, same 2 cores.

page:  ds.map(apply_chat_template(tokenize=False)) → SFTTrainer(dataset_text_field="text", packing=True),
       which tokenizes, builds labels and packs (best-fit decreasing) itself
hfhpc: chatdata.packed_split (template, tokenize, assistant-only labels and the same best-fit-decreasing
       packing as TRL, in worker processes, cached as Arrow) → SFTTrainer(packing=True,
       dataset_kwargs={"skip_prepare_dataset": True}), which takes the packed rows as they are
Every side ends when the SFTTrainer exists with its dataset ready for training, with the same tiny model
and tokenizer. Also timed: hfhpc's next job (the prepared data found in the cache), hfhpc without its
word cache (the tokenizer alone, as for tokenizers the word cache does not apply to), and hfhpc's
tokenized rows handed to TRL for packing (chatdata.prepared_split, which sft.py calls today).
CPU seconds include worker processes; the machine's load average at the start is recorded, since
other work on the same cores slows a side that uses both more than one that uses one.

    python benchmarks/bench_prepare.py [--rows 200000] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import versions, write_result  # noqa: E402

WORDS = ("the model reads a long question about physics chemistry history cooking travel music math code data "
         "and answers with a careful explanation that covers each step in detail before it concludes").split()
MAX_LENGTH = 2048


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def ultrachat_like(rows: int, seed: int = 0):
    """Rows in the ultrachat_200k schema; turn lengths drawn to give ~1,000-token conversations."""
    import datasets

    rng = random.Random(seed)
    def gen():
        for i in range(rows):
            turns = rng.randint(1, 4)
            messages = []
            for _ in range(turns):
                messages.append({"role": "user", "content": sentence(rng, rng.randint(20, 80))})
                messages.append({"role": "assistant", "content": " ".join(sentence(rng, rng.randint(10, 30)) for _ in range(rng.randint(3, 10)))})
            yield {"prompt": messages[0]["content"], "prompt_id": f"{i:08d}", "messages": messages}
    return datasets.Dataset.from_generator(gen)


def trainer_for(model, tokenizer, ds, out: str, **cfg):
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=out, max_length=MAX_LENGTH, packing=True, report_to="none", use_cpu=True,
                     per_device_train_batch_size=1, max_steps=1, **cfg)
    return SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)


class Clock:
    """Wall and CPU seconds (this process and the worker processes it waited for)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, self._cpu() - self.cpu

    @staticmethod
    def _cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--quick", action="store_true", help="only the page's approach and hfhpc's first and next job")
    a = ap.parse_args()
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfhpc import assets
    from hfhpc.demo.build import build_tiny_chat_model
    from hfhpc.recipes import chatdata

    datasets.disable_progress_bars()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mdir = build_tiny_chat_model(tmp / "model")
        tok = AutoTokenizer.from_pretrained(mdir)
        model = AutoModelForCausalLM.from_pretrained(mdir)
        raw = ultrachat_like(a.rows)
        raw.save_to_disk(str(tmp / "raw"))
        del raw

        # The page's approach.
        ds = datasets.load_from_disk(str(tmp / "raw"))
        with Clock() as page:
            text = ds.map(lambda ex: {"text": tok.apply_chat_template(ex["messages"], tokenize=False)},
                          remove_columns=ds.column_names)
            trainer = trainer_for(model, tok, text, str(tmp / "o1"), dataset_text_field="text")
        page_rows = len(trainer.train_dataset)
        del trainer, text, ds

        # hfhpc: the job reads the split from the store; here, from the same folder as the page's side.
        assets_load = assets.load_split
        assets.load_split = lambda *args, **kw: datasets.load_from_disk(str(tmp / "raw"))
        split = dict(dataset_id="bench/ultrachat", commit="c", config=None, split="train_sft", tokenizer=tok,
                     tokenizer_commit="t", assistant_only=True)

        def packed(cache: str, **kw):
            prepared = chatdata.packed_split(**split, cache_root=tmp / cache, max_length=MAX_LENGTH, **kw)
            assert prepared.ready
            return trainer_for(model, tok, prepared.dataset, str(tmp / "o2"),
                               dataset_kwargs={"skip_prepare_dataset": True}), prepared

        try:
            with Clock() as first:
                trainer, prepared = packed("cache")
            ours_rows = len(trainer.train_dataset)
            del trainer, prepared
            with Clock() as next_job:
                trainer, prepared = packed("cache")
            assert prepared.from_cache and len(trainer.train_dataset) == ours_rows
            rows_ds, _ = chatdata.prepared_split(**split, cache_root=tmp / "cache")
            n_tokens = int(sum(len(x) for x in rows_ds.with_format("arrow")["input_ids"].to_pylist()))
            del trainer, prepared, rows_ds
            extra = {}
            if not a.quick:
                with Clock() as alone:
                    trainer, _ = packed("cache-tokenizer-alone", word_cache=False)
                assert len(trainer.train_dataset) == ours_rows
                del trainer
                with Clock() as trl_packs:
                    rows_ds, _ = chatdata.prepared_split(**split, cache_root=tmp / "cache-rows")
                    trainer = trainer_for(model, tok, rows_ds, str(tmp / "o3"))
                assert len(trainer.train_dataset) == ours_rows
                del trainer, rows_ds
                extra = {
                    "hfhpc_first_job_tokenizer_alone_s": round(alone.wall, 2),
                    "hfhpc_first_job_tokenizer_alone_cpu_s": round(alone.cpu, 2),
                    "speedup_first_job_tokenizer_alone": round(page.wall / alone.wall, 2),
                    "hfhpc_rows_then_trl_packing_s": round(trl_packs.wall, 2),
                    "speedup_rows_then_trl_packing": round(page.wall / trl_packs.wall, 2),
                }
        finally:
            assets.load_split = assets_load
    result = {
        "rows": a.rows,
        "tokens": n_tokens,
        "cpu_cores": os.cpu_count(),
        "page_s": round(page.wall, 2),
        "hfhpc_first_job_s": round(first.wall, 2),
        "hfhpc_next_job_s": round(next_job.wall, 2),
        "speedup_first_job": round(page.wall / first.wall, 2),
        "speedup_next_job": round(page.wall / next_job.wall, 2),
        "goal_speedup": 3.0,
        "page_cpu_s": round(page.cpu, 2),
        "hfhpc_first_job_cpu_s": round(first.cpu, 2),
        **extra,
        "packed_rows_page": page_rows,
        "packed_rows_hfhpc": ours_rows,
        "max_length": MAX_LENGTH,
        "loadavg_1m_at_start": round(load, 2),
        "note": ("tiny byte-level BPE tokenizer (1,024 tokens) with a zephyr-style template; hfhpc also builds "
                 "assistant-only labels, and its rows are exactly TRL's own (apply_chat_template + pack_dataset); "
                 "the page's rows differ (its text gets a second EOS). tokens: hfhpc's, before packing"),
        "versions": versions("transformers", "trl", "datasets", "tokenizers", "pyarrow"),
    }
    print(write_result("prepare_speed", result).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
