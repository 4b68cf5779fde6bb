"""Q&A stages scored on answers: the prompt masked from the loss, exact match and token F1 by greedy
generation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evolm import rows
from evolm.answers import exact_match, greedy_answers, split_row, token_f1
from evolm.base import load_base
from evolm.configfile import parse_config
from evolm.data import answer_rows
from evolm.errors import ConfigError
from evolm.objectives import EvalContext, measure_all
from evolm.train import evaluate
from tests.conftest import tiny_experiment


@pytest.fixture(scope="module")
def base(corpora, tmp_path_factory):
    raw = tiny_experiment(corpora, tmp_path_factory.mktemp("out"))
    raw["model"].pop("pretrain")
    return load_base(parse_config(raw))


def test_rows_label_the_answer_and_its_end_only(base):
    tok = base.tokenizer
    examples = [{"prompt": "Q: What does len do?\nA:", "answer": " Return the length."}]
    row = answer_rows(examples, tok, 32, "test")[0]
    prompt, answer, eos = split_row(row)
    assert tok.decode(prompt) == examples[0]["prompt"] and tok.decode(answer) == examples[0]["answer"]
    assert eos == tok.eos_token_id
    labelled = row["labels"] != rows.IGNORE
    assert labelled.sum() == len(answer) + 1 and not labelled[: len(prompt)].any()


def test_the_loss_is_the_answer_tokens_mean_negative_log_likelihood(base):
    qa = base.domains[1].blocks["validation"][:4]
    assert qa.dtype.names == ("input_ids", "labels")
    with torch.no_grad():
        ids = torch.from_numpy(qa["input_ids"].astype(np.int64))
        logp = base.model(input_ids=ids).logits.log_softmax(-1)[:, :-1]
        targets = torch.from_numpy(qa["labels"].astype(np.int64))[:, 1:]
        mask = targets != rows.IGNORE
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        expected = float(-(picked * mask).sum() / mask.sum())
    assert evaluate(base.model, qa, batch_size=4) == pytest.approx(expected, rel=1e-5)


def test_exact_match_after_the_model_learned_the_answer(base):
    """A model trained on one Q&A row answers it exactly; a row whose answer differs in its last token
    does not match but shares tokens."""
    import copy

    from evolm.train import train_loop

    learned = answer_rows([{"prompt": "Q: What does json.dumps do?\nA:", "answer": " Serialize obj."}],
                          base.tokenizer, 32, "test")
    model = copy.deepcopy(base.model)
    train_loop(model, np.repeat(learned, 8), {"learning_rate": 3e-3, "max_steps": 60,
                                              "per_device_train_batch_size": 4}, 0, torch.device("cpu"))
    other = learned.copy()
    _, answer, _ = split_row(other[0])
    n_prompt = int(np.flatnonzero(other[0]["labels"] != rows.IGNORE)[0])
    changed = (answer[-1] + 1) % len(base.tokenizer)
    other["input_ids"][0, n_prompt + len(answer) - 1] = changed
    other["labels"][0, n_prompt + len(answer) - 1] = changed
    pairs = greedy_answers(model, np.concatenate([learned, other]), None)
    assert pairs[0] == (answer, answer) and exact_match(pairs[:1]) == 1.0
    assert exact_match(pairs[1:]) == 0.0 and 0.5 < token_f1(pairs[1:]) < 1.0


def test_token_f1_counts_shared_tokens():
    assert token_f1([([1, 2, 3], [1, 2, 4])]) == pytest.approx(2 / 3)
    assert token_f1([([], [1])]) == 0.0 and exact_match([([5], [5]), ([5], [6])]) == 0.5


def test_answer_objectives_are_measured_on_qa_stages_only(base):
    training = {"eval_batch_size": 8, "eval_max_batches": 1, "eval_max_examples": 3}
    qa = EvalContext(base.model, {"validation": base.domains[1].blocks["validation"]}, training, base.device, 0, True)
    text = EvalContext(base.model, {"validation": base.domains[0].blocks["validation"]}, training, base.device, 0, True)
    measured = measure_all([], qa)
    assert -1.0 <= measured["exact_match"] <= 0.0 and -1.0 <= measured["token_f1"] <= 0.0  # stored negated
    assert "exact_match" not in measure_all([], text) and "accuracy" not in measure_all([], text)


def test_a_template_without_the_answer_at_its_end_is_refused(corpora, tmp_path):
    raw = tiny_experiment(corpora, tmp_path)
    raw["stages"][1]["template"] = "{answer} is the answer to {question}"
    with pytest.raises(ConfigError, match=r"template must end with \{answer\}.*loss_on: all"):
        parse_config(raw)
    raw["stages"][1]["loss_on"] = "all"  # the old behaviour: the whole text is a document
    base = load_base(parse_config(raw | {"model": {"build": raw["model"]["build"]}}))
    assert base.domains[1].blocks["train"].ndim == 2


def test_a_qa_run_records_answer_scores(corpora, tmp_path):
    from evolm.continual import ContinualRun
    from evolm.executor import LocalExecutor

    raw = tiny_experiment(corpora, tmp_path, training={"per_device_train_batch_size": 4, "eval_batch_size": 8,
                                                       "eval_max_batches": 2, "eval_max_examples": 4})
    raw["search"]["objectives"] = ["val_loss", "exact_match"]
    raw["stages"] = raw["stages"][1:]
    ContinualRun(parse_config(raw), tmp_path / "run", lambda: LocalExecutor(threads=1)).run()
    records = [json.loads(line) for line in (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()]
    assert records and all({"exact_match", "token_f1"} <= r["objectives"].keys() for r in records if r["status"] == "ok")
