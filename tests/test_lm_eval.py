"""EleutherAI's lm-evaluation-harness as a real client: a local task (tests/data/lm_eval: a multiple-choice part and
a generate_until part, no hub) run through lm-eval's `local-completions` model against a live jachat, and through
its Hugging Face backend on the same float32 checkpoint: the same choices, the same log-likelihoods within 1e-3, the
same generations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.servers import serving
from tests.test_http_api import http_flags, model_id

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["jachat_tiny_mc", "jachat_tiny_gen"]


def evaluate(model: str, model_args: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(ROOT / "tests" / "data" / "lm_eval"))
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=TASKS, task_manager=tasks, log_samples=True
    )
    assert results is not None
    samples: dict[str, list[dict[str, Any]]] = results["samples"]
    return {task: sorted(samples[task], key=lambda s: s["doc_id"]) for task in TASKS}


@pytest.mark.slow
def test_lm_evals_completions_client_and_its_hugging_face_backend_agree(
    model_f32: Path, demo_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the task's data_files path is relative to the repository
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with serving(model_f32, *http_flags()) as server:
        before = server.scrape()
        served = evaluate(
            "local-completions",
            {
                "base_url": f"http://127.0.0.1:{server.http_port}/v1/completions",
                "model": model_id(server),
                "tokenizer": str(demo_checkpoint),
                "tokenizer_backend": "huggingface",
                "use_fast_tokenizer": False,  # rinna's tokenizer is sentencepiece itself
                "num_concurrent": 1,
                "max_retries": 1,
            },
        )
        after = server.scrape()
    name = 'jachat_requests_total{api="http",code="OK",rpc="/v1/completions"}'
    choices = sum(len(s["resps"]) for s in served["jachat_tiny_mc"])
    assert after[name] - before.get(name, 0.0) >= choices + len(served["jachat_tiny_gen"])
    # add_bos_token=False: without it lm-eval lets the tokenizer add its special tokens, and rinna's (T5Tokenizer)
    # appends </s> to every context and continuation it encodes, which shifts the continuation's tokens
    reference = evaluate(
        "hf",
        {
            "pretrained": str(demo_checkpoint),
            "dtype": "float32",
            "device": "cpu",
            "use_fast_tokenizer": False,
            "add_bos_token": False,
        },
    )
    for ours, theirs in zip(served["jachat_tiny_mc"], reference["jachat_tiny_mc"], strict=True):
        mine = [r[0] for r in ours["resps"]]
        hf = [r[0] for r in theirs["resps"]]
        assert [ll for ll, _ in mine] == pytest.approx([ll for ll, _ in hf], abs=1e-3)
        assert [greedy for _, greedy in mine] == [greedy for _, greedy in hf]
        chosen = max(range(len(mine)), key=lambda i: mine[i][0])
        assert chosen == max(range(len(hf)), key=lambda i: hf[i][0])
    generated = [s["filtered_resps"] for s in served["jachat_tiny_gen"]]
    assert generated == [s["filtered_resps"] for s in reference["jachat_tiny_gen"]]
    assert all(text[0] for text in generated)
