"""Exported transformers end to end against dense float64 truths: a BERT-style classifier (three
integer inputs) and a GPT-style causal language model (labels derived from input_ids, padding
ignored). Tolerances: eigenvalues 1e-6 relative (Lanczos to a 1e-8 residual in float64), the
trace within 3 of its standard errors, the
non-uniformity 1e-3 relative (its power iteration's tolerance), losses 1e-10.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import save_file

from curvscope_service.engine import AnalysisJob, EngineLimits, run_analysis
from curvscope_service.errors import InvalidInput, Unimplemented
from curvscope_service.loading import load_data, load_model
from curvscope_service.losses import bind_loss

from .conftest import Case, bert, dense_truth, export, per_sequence_hessians, reference_loss


@pytest.fixture(params=["bert_case", "gpt_case"])
def case(request) -> Case:
    return request.getfixturevalue(request.param)


def analyse(case: Case, analyses: dict, *, data=None, precision: str = "float64", **options) -> dict:
    job = AnalysisJob(model_path=case.model, model_sha256="m", loss="cross_entropy", analyses=analyses,
                      data_path=data or case.data, precision=precision, task=case.task, **options)
    return run_analysis(job)


def test_loss_eigenvalues_and_trace_match_the_dense_hessian(case):
    truth = dense_truth(case)
    eigenvalues = torch.linalg.eigvalsh(truth)
    report = analyse(case, {"hessian_eigen": {"top_k": 2, "bottom_k": 1, "tolerance": 1e-8},
                            "hessian_trace": {"method": "TRACE_METHOD_HUTCH_PLUS_PLUS", "max_hvps": 60}})
    with torch.no_grad():
        loss = reference_loss(case, copy.deepcopy(case.module).double()(*case.inputs))
    assert report["loss"]["value"] == pytest.approx(float(loss), rel=1e-10)
    eigen = report["results"]["hessian_eigen"]
    assert eigen["largest"] == pytest.approx(eigenvalues[-2:].flip(0).tolist(), rel=1e-6)
    assert eigen["smallest"] == pytest.approx(eigenvalues[:1].tolist(), rel=1e-6)
    trace = report["results"]["hessian_trace"]
    assert abs(trace["estimate"] - float(truth.trace())) <= 3 * trace["stderr"] + 1e-9 * abs(float(truth.trace()))


def test_density_weights_sum_to_one_and_cover_the_spectrum(case):
    eigenvalues = torch.linalg.eigvalsh(dense_truth(case))
    density = analyse(case, {"hessian_density": {"lanczos_steps": 30, "num_probes": 2}})["results"]["hessian_density"]
    assert sum(density["weights"]) == pytest.approx(2.0, abs=1e-8)  # each probe's quadrature weights sum to 1
    # Gauss quadrature nodes lie within the spectrum, and 30 steps reach its ends
    assert min(density["nodes"]) >= float(eigenvalues[0]) - 1e-6 and max(density["nodes"]) <= float(eigenvalues[-1]) + 1e-6
    assert max(density["nodes"]) == pytest.approx(float(eigenvalues[-1]), rel=1e-3)


def test_non_uniformity_treats_a_sequence_as_a_sample(case):
    hessians = per_sequence_hessians(case)
    mean = torch.stack(hessians).mean(0)
    torch.testing.assert_close(mean, dense_truth(case), rtol=1e-9, atol=1e-9)  # the loss is the mean of the per-sequence losses
    sigma = sum(h @ h for h in hessians) / len(hessians) - mean @ mean
    truth = math.sqrt(float(torch.linalg.eigvalsh(sigma)[-1]))
    result = analyse(case, {"non_uniformity": {"tolerance": 1e-6}})["results"]["non_uniformity"]
    assert result["value"] == pytest.approx(truth, rel=1e-3)


def test_sharpness_measures_and_weight_spectra_run(case):
    top = float(torch.linalg.eigvalsh(dense_truth(case))[-1])
    report = analyse(case, {"sharpness": {}, "epsilon_sharpness": {}, "adaptive_sharpness": {}, "weight_spectra": {}},
                     per_layer=False)
    results = report["results"]
    assert results["sharpness"]["value"] == pytest.approx(top, rel=1e-3)
    # the maximum over a box around the weights is at least the loss at the weights themselves
    assert results["epsilon_sharpness"]["max_loss"] >= report["loss"]["value"] and results["epsilon_sharpness"]["value"] >= 0
    assert results["adaptive_sharpness"]["perturbed_loss"] >= report["loss"]["value"] - 1e-12
    model = load_model(case.model)
    weights = dict(model.module.named_parameters())
    for layer in results["weight_spectra"]["layers"]:
        matrix = weights.get(layer["name"] + ".weight")
        if matrix is not None and matrix.dim() == 2:
            norm = float(torch.linalg.matrix_norm(matrix.detach().double(), ord=2))
            assert layer["spectral_norm"] == pytest.approx(norm, rel=1e-5)


def test_per_layer_blocks_carry_the_module_names(bert_case):
    report = analyse(bert_case, {"hessian_trace": {"method": "TRACE_METHOD_HUTCH_PLUS_PLUS", "max_hvps": 60}}, per_layer=True)
    blocks = set(report["per_layer"])
    assert {"model.bert.encoder.layer.0.attention", "model.bert.encoder.layer.0.intermediate",
            "model.classifier"} <= blocks
    assert not any(block.isdigit() for block in blocks)


def test_masked_tokens_change_nothing(case, tmp_path):
    """Other token ids under attention_mask 0 (ignored labels there): same loss, same spectrum."""
    ids, mask = case.inputs[0].clone(), case.inputs[1]
    ids[mask == 0] = (ids[mask == 0] + 5) % 7
    tensors = {"input_ids": ids, "attention_mask": mask}
    if case.task != "causal-lm":
        tensors.update(token_type_ids=case.inputs[2], targets=case.targets)
    save_file(tensors, str(tmp_path / "other-padding.safetensors"))
    analyses = {"hessian_eigen": {"top_k": 1, "tolerance": 1e-8}}
    before, after = analyse(case, analyses), analyse(case, analyses, data=tmp_path / "other-padding.safetensors")
    assert after["loss"]["value"] == pytest.approx(before["loss"]["value"], rel=1e-12)
    assert after["results"]["hessian_eigen"]["largest"] == pytest.approx(before["results"]["hessian_eigen"]["largest"], rel=1e-8)


def test_integer_inputs_stay_integers_in_float64(gpt_case):
    model = load_model(gpt_case.model, dtype=torch.float64)
    data = load_data(gpt_case.data, dtype=torch.float64, model_inputs=model.inputs, task="causal-lm")
    assert [x.dtype for x in data.inputs] == [torch.int64, torch.int64]
    torch.testing.assert_close(data.targets, gpt_case.targets)  # input_ids, -100 under the mask
    logits = model.module(*data.inputs)
    assert logits.dtype == torch.float64 and logits.shape == (6, 5, 7)


def test_micro_batches_add_up_to_the_token_mean(gpt_case):
    """The token mean's normaliser is the whole batch's: micro-batch losses weighted by their
    share of the samples add up to it exactly."""
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5, 7, dtype=torch.float64), gpt_case.targets
    loss = bind_loss("cross_entropy", labels, "causal-lm")
    whole = reference_loss(gpt_case, logits)
    parts = sum(loss(logits[i:i + 2], labels[i:i + 2]) * 2 / 6 for i in range(0, 6, 2))
    assert float(loss(logits, labels)) == pytest.approx(float(whole), rel=1e-12)
    assert float(parts) == pytest.approx(float(whole), rel=1e-12)


def test_sdpa_models_give_the_eager_models_products(tmp_path, bert_case):
    """Scaled-dot-product attention (no forward-mode AD, no double backward in its fused kernel)
    runs its math kernel: the SDPA export of the same weights has the eager export's spectrum."""
    sdpa = bert("sdpa")
    sdpa.load_state_dict(bert_case.module.state_dict())
    path = export(sdpa, bert_case.inputs, tmp_path / "bert-sdpa.pt2")
    graph = load_model(path).module.graph
    assert any("scaled_dot_product_attention" in str(node.target) for node in graph.nodes)
    analyses = {"hessian_eigen": {"top_k": 1, "tolerance": 1e-8}, "non_uniformity": {}}
    eager = analyse(bert_case, analyses)
    fused = analyse(Case(path, bert_case.data, "", sdpa, bert_case.inputs, bert_case.targets), analyses)
    assert fused["results"]["hessian_eigen"]["largest"] == pytest.approx(eager["results"]["hessian_eigen"]["largest"], rel=1e-7)
    assert fused["results"]["non_uniformity"]["value"] == pytest.approx(eager["results"]["non_uniformity"]["value"], rel=1e-6)


@pytest.mark.parametrize("curvature", ["ggn", "fisher", "empirical_fisher"])
def test_output_curvatures_on_token_outputs_are_positive_semidefinite(gpt_case, curvature):
    # The smallest eigenvalue of a PSD matrix is about 0, where a relative tolerance is never met:
    # a fixed budget instead. Ritz values lie inside the spectrum, converged or not, so a
    # negative one would show an indefinite operator.
    smallest = analyse(gpt_case, {"hessian_eigen": {"top_k": 1, "bottom_k": 1, "max_hvps": 40}},
                       curvature=curvature)["results"]["hessian_eigen"]["smallest"][0]
    assert smallest >= -1e-8


def test_lipschitz_on_token_ids_says_why_in_one_line(bert_case):
    with pytest.raises(InvalidInput, match="token ids have no Lipschitz constant") as error:
        analyse(bert_case, {"lipschitz": {}})
    assert "\n" not in str(error.value)


def test_lipschitz_on_embeddings_gives_a_lower_bound_and_names_attention(tmp_path):
    class FromEmbeddings(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = bert().model

        def forward(self, inputs_embeds):
            return self.model(inputs_embeds=inputs_embeds).logits

    embeddings = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(3))
    model = FromEmbeddings().eval()
    path = tmp_path / "embeddings.pt2"
    torch.export.save(torch.export.export(model, (embeddings,), dynamic_shapes=({0: torch.export.Dim("batch")},)), str(path))
    save_file({"inputs": embeddings, "targets": torch.arange(6) % 3}, str(tmp_path / "data.safetensors"))
    result = analyse(Case(path, tmp_path / "data.safetensors", "", model, (embeddings,), torch.arange(6) % 3),
                     {"lipschitz": {"methods": ["LIPSCHITZ_METHOD_NAIVE", "LIPSCHITZ_METHOD_LOWER"], "ascent_steps": 3}})
    interval = result["results"]["lipschitz"]
    assert interval["lower"] > 0 and interval["upper"] == math.inf
    assert "attention product" in interval["note"]


@pytest.mark.parametrize(("tensors", "task", "message"), [
    ({"input_ids": torch.zeros(2, 5, dtype=torch.long)}, "", "lacks the model's input 'attention_mask'"),
    ({"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long)}, "",
     "lacks 'targets'"),
    ({"input_ids": torch.full((2, 5), 0.5), "attention_mask": torch.ones(2, 5, dtype=torch.long)}, "causal-lm",
     "holds fractional values"),
    ({"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.zeros(2, 5, dtype=torch.long)}, "causal-lm",
     "every label is -100"),
    ({"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
      "targets": torch.full((2, 5), 40)}, "causal-lm", "labels hold 40..40"),
])
def test_bad_language_model_data_is_refused_in_one_line(gpt_case, tmp_path, tensors, task, message):
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(InvalidInput, match=message) as error:
        analyse(Case(gpt_case.model, tmp_path / "bad.safetensors", task, gpt_case.module, (), gpt_case.targets),
                {"hessian_trace": {}}, data=tmp_path / "bad.safetensors")
    assert "\n" not in str(error.value)


def test_positional_input_names_are_the_fallback(bert_case, tmp_path):
    ids, mask, types = bert_case.inputs
    save_file({"inputs.0": ids, "inputs.1": mask, "inputs.2": types, "targets": bert_case.targets},
              str(tmp_path / "positional.safetensors"))
    named = analyse(bert_case, {"hessian_eigen": {"top_k": 1}})
    positional = analyse(bert_case, {"hessian_eigen": {"top_k": 1}}, data=tmp_path / "positional.safetensors")
    assert positional["loss"]["value"] == named["loss"]["value"]


def test_an_operator_without_the_derivative_an_analysis_needs_is_one_line_unimplemented(gpt_case):
    """The Gauss-Newton per-sample path vmaps jacrev over a graph with symbolic sizes, which
    torch 2.13 cannot batch: UNIMPLEMENTED in one line naming the cause, not a traceback."""
    with pytest.raises(Unimplemented, match="non_uniformity needs derivatives torch does not have") as error:
        analyse(gpt_case, {"non_uniformity": {"method": "NON_UNIFORMITY_METHOD_GAUSS_NEWTON"}})
    assert "\n" not in str(error.value)


def test_the_task_option_travels_from_the_client_and_is_checked(gpt_case):
    from curvscope import build_request
    from curvscope._proto.curvscope.v1 import curvscope_pb2 as pb
    from curvscope_service.engine import validate_job
    from curvscope_service.requests import job_from_request

    request = build_request(pb.ModelRef(), task="causal-lm")
    assert request.options.task == "causal-lm"
    job = job_from_request(request, (gpt_case.model, "m"), (gpt_case.data, "d"))
    assert job.task == "causal-lm"
    with pytest.raises(ValueError, match="task must be one of"):
        build_request(pb.ModelRef(), task="translation")
    bad = AnalysisJob(model_path=gpt_case.model, model_sha256="m", loss="cross_entropy", data_path=gpt_case.data,
                      analyses={"hessian_trace": {}}, task="translation")
    with pytest.raises(InvalidInput, match="unknown task 'translation'"):
        validate_job(bad, EngineLimits())
    with pytest.raises(InvalidInput, match="causal-lm needs the loss cross_entropy"):
        validate_job(AnalysisJob(model_path=gpt_case.model, model_sha256="m", loss="mse", data_path=gpt_case.data,
                                 analyses={"hessian_trace": {}}, task="causal-lm"), EngineLimits())
