"""Each stage's winner and runners-up in PEFT's format, loadable with PEFT alone."""
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.tiny_runs import make_tiny_run


@pytest.fixture(scope="module")
def run_dir(corpora, tmp_path_factory):
    return make_tiny_run(corpora, tmp_path_factory.mktemp("adapters") / "run")


def test_every_stage_keeps_its_best_adapters_in_peft_format(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())["stages"]
    x = torch.randint(0, 300, (2, 16))
    for s in summary:
        k = s["stage"]
        ranking = json.loads((run_dir / "adapters" / f"stage-{k}" / "peft" / "ranking.json").read_text())
        assert 2 <= len(ranking) <= 4 and ranking[0]["genome_id"] == s["winner"]["result_of"]
        assert [r["path"] for r in ranking] == s["adapters"]
        for r in ranking:  # a plain transformers model + PEFT load each one: no evolm involved
            base = AutoModelForCausalLM.from_pretrained(run_dir / "models" / f"stage-{k - 1}").eval()
            with torch.no_grad():
                plain = base(x).logits
                adapted = PeftModel.from_pretrained(base, run_dir / r["path"]).eval()
                assert (adapted(x).logits - plain).abs().max() > 1e-4  # the adapter does something
        # the winner folded into its stage's base is exactly the saved next base (merge: best)
        base = AutoModelForCausalLM.from_pretrained(run_dir / "models" / f"stage-{k - 1}").eval()
        merged = PeftModel.from_pretrained(base, run_dir / ranking[0]["path"]).merge_and_unload().state_dict()
        saved = AutoModelForCausalLM.from_pretrained(run_dir / "models" / f"stage-{k}").state_dict()
        assert set(merged) == set(saved)
        assert all(torch.allclose(merged[n], saved[n], atol=1e-6) for n in saved)
