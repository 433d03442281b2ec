"""The script scanner: realistic scripts, and the exact findings with their line numbers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hfhpc.errors import UsageError
from hfhpc.offline.scan import Finding, scan_file, scan_source


def scan(tmp_path: Path, source: str, name: str = "script.py") -> tuple[str, list[Finding]]:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source).lstrip("\n"))
    return str(path), scan_file(path)


def test_pipeline_with_explicit_model_and_tokenizer(tmp_path: Path) -> None:
    path, findings = scan(
        tmp_path,
        """
        from transformers import pipeline

        classifier = pipeline(
            "sentiment-analysis",
            model="nlptown/bert-base-multilingual-uncased-sentiment",
            tokenizer="google-bert/bert-base-multilingual-uncased",
        )
        # The same id twice is one finding.
        ner = pipeline("ner", model="dslim/bert-base-NER", tokenizer="dslim/bert-base-NER", revision="v1.0")
        print(classifier("Nous sommes très heureux de vous présenter la bibliothèque 🤗 Transformers."))
        """,
    )
    assert findings == [
        Finding("model", "nlptown/bert-base-multilingual-uncased-sentiment", None, path, 3, "pipeline", False, "sentiment-analysis"),
        Finding("model", "google-bert/bert-base-multilingual-uncased", None, path, 3, "pipeline", False, "sentiment-analysis (tokenizer)"),
        Finding("model", "dslim/bert-base-NER", "v1.0", path, 9, "pipeline", False, "ner"),
    ]


def test_sft_script_with_ultrachat(tmp_path: Path) -> None:
    path, findings = scan(
        tmp_path,
        """
        from datasets import load_dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        MODEL_ID = "HuggingFaceH4/mistral-7b-sft-beta"

        dataset = load_dataset("HuggingFaceH4/ultrachat_200k", split="train_sft")
        eval_dataset = load_dataset("HuggingFaceH4/ultrachat_200k", "default", split="test_sft", revision="main")
        local = load_dataset("json", data_files={"train": "train.jsonl"})
        tokenizer = AutoTokenizer.from_pretrained(MODEL_ID)
        model = AutoModelForCausalLM.from_pretrained(MODEL_ID, dtype="auto")
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(output_dir="zephyr-sft", packing=True),
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        trainer.save_model()
        """,
    )
    assert findings == [
        Finding("dataset", "HuggingFaceH4/ultrachat_200k", None, path, 7, "load_dataset", False, "split=train_sft"),
        Finding("dataset", "HuggingFaceH4/ultrachat_200k", "main", path, 8, "load_dataset", False, "name=default, split=test_sft"),
        Finding("model", "HuggingFaceH4/mistral-7b-sft-beta", None, path, 10, "AutoTokenizer.from_pretrained", False, ""),
        Finding("model", "HuggingFaceH4/mistral-7b-sft-beta", None, path, 11, "AutoModelForCausalLM.from_pretrained", False, ""),
    ]


def test_evaluate_metrics(tmp_path: Path) -> None:
    path, findings = scan(
        tmp_path,
        """
        import evaluate
        import numpy as np
        from evaluate import load as load_metric

        accuracy = evaluate.load("accuracy")
        f1 = load_metric("f1", "multilabel")
        word_length = evaluate.load("word_length", module_type="measurement")
        community = evaluate.load("lvwerra/element_count", revision="main")
        mine = evaluate.load("./metrics/my_metric.py")
        clf_metrics = evaluate.combine(["precision", "recall"])


        def compute_metrics(eval_pred):
            logits, labels = eval_pred
            return accuracy.compute(predictions=np.argmax(logits, axis=-1), references=labels)
        """,
    )
    assert findings == [
        Finding("metric", "evaluate-metric/accuracy", None, path, 5, "evaluate.load", False, ""),
        Finding("metric", "evaluate-metric/f1", None, path, 6, "load_metric", False, "config_name=multilabel"),
        Finding("metric", "evaluate-measurement/word_length", None, path, 7, "evaluate.load", False, ""),
        Finding("metric", "lvwerra/element_count", "main", path, 8, "evaluate.load", False, ""),
        Finding("metric", "evaluate-metric/precision", None, path, 10, "evaluate.combine", False, ""),
        Finding("metric", "evaluate-metric/recall", None, path, 10, "evaluate.combine", False, ""),
    ]


def test_cifar10_accelerate_script_with_torchvision_download(tmp_path: Path) -> None:
    path, findings = scan(
        tmp_path,
        """
        import argparse

        import torch
        from accelerate import Accelerator
        from torchvision import datasets, transforms


        def main():
            parser = argparse.ArgumentParser(description="CIFAR-10 with accelerate")
            parser.add_argument("--epochs", type=int, default=5)
            parser.add_argument("--data-dir", default="./data")
            args = parser.parse_args()
            accelerator = Accelerator()
            transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,) * 3, (0.5,) * 3)])
            with accelerator.main_process_first():
                train_set = datasets.CIFAR10(root=args.data_dir, train=True, download=True, transform=transform)
                test_set = datasets.CIFAR10(args.data_dir, train=False, download=True, transform=transform)
            loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True)
            model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
            model, optimizer, loader = accelerator.prepare(model, optimizer, loader)


        if __name__ == "__main__":
            main()
        """,
    )
    assert findings == [
        Finding("torchvision-download", None, None, path, 16, "datasets.CIFAR10", False, "root=./data"),
        Finding("torchvision-download", None, None, path, 17, "datasets.CIFAR10", False, "root=./data"),
    ]


def test_task_only_pipeline_names_the_installed_default(tmp_path: Path) -> None:
    path, findings = scan(
        tmp_path,
        """
        import transformers

        classifier = transformers.pipeline("text-classification")
        sentiment = transformers.pipeline(task="sentiment-analysis", device=-1)
        print(classifier("We are very happy to show you the 🤗 Transformers library."))
        """,
    )
    default = "distilbert/distilbert-base-uncased-finetuned-sst-2-english"
    assert findings == [
        Finding("pipeline-default", default, "714eb0f", path, 3, "transformers.pipeline", False, "text-classification"),
        Finding("pipeline-default", default, "714eb0f", path, 4, "transformers.pipeline", False, "sentiment-analysis"),
    ]


def test_argparse_and_dataclass_defaults(tmp_path: Path) -> None:
    path, findings = scan(
        tmp_path,
        """
        import argparse
        from dataclasses import dataclass, field

        from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser


        @dataclass
        class ModelArguments:
            model_name_or_path: str = field(default="google-bert/bert-base-cased", metadata={"help": "model id"})


        def main():
            args = parse_args()
            (model_args,) = HfArgumentParser(ModelArguments).parse_args_into_dataclasses()
            model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, num_labels=2)
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name)
            model.save_pretrained(args.output_dir)
            reloaded = AutoModelForSequenceClassification.from_pretrained(args.output_dir)


        def parse_args():
            parser = argparse.ArgumentParser()
            parser.add_argument("--tokenizer-name", default="google-bert/bert-base-uncased")
            parser.add_argument("--output_dir", default="./results")
            return parser.parse_args()
        """,
    )
    assert findings == [
        Finding("model", "google-bert/bert-base-cased", None, path, 15, "AutoModelForSequenceClassification.from_pretrained", False, ""),
        Finding("model", "google-bert/bert-base-uncased", None, path, 16, "AutoTokenizer.from_pretrained", False, ""),
    ]


def test_dynamic_ids_and_hub_downloads(tmp_path: Path) -> None:
    path, findings = scan(
        tmp_path,
        """
        import os
        import sys

        from huggingface_hub import hf_hub_download, snapshot_download
        from transformers import AutoModel

        model = AutoModel.from_pretrained(sys.argv[1])
        env_model = AutoModel.from_pretrained(os.environ.get("MODEL_ID", "google-bert/bert-base-uncased"))
        path = snapshot_download("HuggingFaceH4/ultrachat_200k", repo_type="dataset", revision="main")
        config = hf_hub_download(repo_id="openai-community/gpt2", filename="config.json", subfolder="onnx")
        for name in ("org/a", "org/b"):
            AutoModel.from_pretrained(name)
        """,
    )
    assert findings == [
        Finding("model", None, None, path, 7, "AutoModel.from_pretrained", True, ""),
        Finding("model", "google-bert/bert-base-uncased", None, path, 8, "AutoModel.from_pretrained", True, ""),
        Finding("download", "HuggingFaceH4/ultrachat_200k", "main", path, 9, "snapshot_download", False, "repo_type=dataset"),
        Finding("download", "openai-community/gpt2", None, path, 10, "hf_hub_download", False, "subfolder=onnx, filename=config.json"),
        Finding("model", None, None, path, 12, "AutoModel.from_pretrained", True, ""),
    ]


def test_resolution_rules() -> None:
    source = textwrap.dedent(
        """
        import os
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, pipeline

        ORG = "meta-llama"
        NAME: str = "Llama-3.2-1B"
        TWICE = "org/first"
        TWICE = "org/second"

        base = AutoModelForCausalLM.from_pretrained(f"{ORG}/{NAME}")
        joined = AutoModelForCausalLM.from_pretrained(ORG + "/" + NAME + "-Instruct")
        ambiguous = AutoModelForCausalLM.from_pretrained(TWICE)
        adapter = PeftModel.from_pretrained(base, "ybelkada/opt-350m-lora")
        home = AutoModelForCausalLM.from_pretrained("~/models/llama")
        required = AutoModelForCausalLM.from_pretrained(os.environ["MODEL_ID"])
        generator = pipeline("text-generation", model=base)
        from_env_task = pipeline(os.getenv("TASK", "text-classification"))


        def load(model_id="org/default"):
            local_id = "org/local"
            return AutoModelForCausalLM.from_pretrained(local_id), AutoModelForCausalLM.from_pretrained(model_id)


        def load_dataset(name):  # the script's own function, not datasets'
            return name
        load_dataset("not/a-dataset")
        """
    ).lstrip("\n")
    findings = [(f.line, f.kind, f.repo_id, f.dynamic) for f in scan_source(source, "<test>")]
    assert findings == [
        (10, "model", "meta-llama/Llama-3.2-1B", False),
        (11, "model", "meta-llama/Llama-3.2-1B-Instruct", False),
        (12, "model", None, True),
        (13, "model", "ybelkada/opt-350m-lora", False),
        (15, "model", None, True),
        # pipeline(model=<a loaded model>) adds nothing: its from_pretrained is already listed.
        (17, "pipeline-default", "distilbert/distilbert-base-uncased-finetuned-sst-2-english", True),
        (22, "model", "org/local", False),
        (22, "model", None, True),
    ]


def test_paths_that_exist_are_not_repository_ids(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "final").mkdir(parents=True)
    _, findings = scan(
        tmp_path,
        """
        from transformers import AutoModel
        from datasets import load_dataset

        model = AutoModel.from_pretrained("checkpoints/final")
        data = load_dataset("/scratch/data/ultrachat")
        """,
    )
    assert findings == []


def test_syntax_error_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match=r"train\.py:1: cannot parse"):
        scan_source("def broken(:\n", "train.py")


def test_scanning_imports_nothing_heavy_unless_a_pipeline_has_no_model() -> None:
    code = textwrap.dedent(
        """
        import sys
        from hfhpc.offline.scan import scan_source
        findings = scan_source("from transformers import AutoModel\\nAutoModel.from_pretrained('gpt2')\\n")
        assert [f.repo_id for f in findings] == ["gpt2"]
        print(sorted(m for m in ("torch", "transformers", "datasets", "evaluate") if m in sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
