"""Training-loop callbacks: tiny models train a few steps; the values logged through the trainer
match the same analyses run directly and a dense float64 Hessian; the analysis runs beside the
loop (held open with an event, never timed); a failed gate stops training."""

from __future__ import annotations

import importlib
import os
import threading
from typing import Any

import pytest
import torch
from torch import nn

from curvscope.callbacks import CurvatureMonitor, report_values
from curvscope.policy import parse_policy
from tests.dense_reference import dense_hessian

LEARNING_RATE = 0.1


# Each framework with the callback module built on it (which imports its trainer classes).
CALLBACK_MODULES = {"transformers": "curvscope.callbacks.transformers", "lightning.pytorch": "curvscope.callbacks.lightning"}


def framework(name: str) -> Any:
    """Import a training framework and our callback for it; where they cannot be imported (not
    installed, or broken by a torchvision built for another torch next to them) skip on a
    developer's machine, fail under CI."""
    try:
        importlib.import_module(CALLBACK_MODULES[name])
        return importlib.import_module(name)
    except Exception as error:  # noqa: BLE001 - any import failure is reported the same way
        message = f"{name} cannot be imported here ({type(error).__name__}: {error})"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message)
        pytest.skip(message)


def evaluation_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return torch.randn(32, 5, generator=generator), torch.randint(0, 3, (32,), generator=generator)


class GatedClient:
    """A client whose analyses wait until the test releases them: the analysis stays in flight
    for as many training steps as the test wants, without a clock."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.release = threading.Event()

    def upload_bytes(self, *args: Any, **kwargs: Any) -> str:
        return self.client.upload_bytes(*args, **kwargs)

    def analyze_request(self, *args: Any, **kwargs: Any) -> Any:
        assert self.release.wait(120), "the test never released the analysis"
        return self.client.analyze_request(*args, **kwargs)


# -- Hugging Face ---------------------------------------------------------------------------------
class HFClassifier(nn.Module):
    """A model as the Trainer drives it: named inputs and labels in, a dict with the loss out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.net(inputs)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def hf_trainer(tmp_path, callbacks: list, max_steps: int) -> Any:
    transformers = framework("transformers")
    generator = torch.Generator().manual_seed(8)
    x, y = torch.randn(64, 5, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    train = [{"inputs": x[i], "labels": y[i]} for i in range(len(x))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=max_steps, learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant", optim="sgd", report_to=[], logging_steps=10_000, save_strategy="no",
        use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return transformers.Trainer(model=HFClassifier(), args=args, train_dataset=train, callbacks=callbacks)


def recorder() -> tuple[Any, list[dict[str, float]]]:
    transformers = framework("transformers")
    logged: list[dict[str, float]] = []

    class Record(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if any(key.startswith("curvscope/") for key in logs or {}):
                logged.append(dict(logs))

    return Record(), logged


def test_hugging_face_callback_logs_what_a_direct_analysis_reports(tmp_path, client):
    framework("transformers")
    from curvscope.callbacks.transformers import CurvscopeCallback

    x, y = evaluation_batch()
    record, logged = recorder()
    callback = CurvscopeCallback({"inputs": x, "labels": y}, every_steps=6, client=client, sharpness=True,
                                 trace=True, precision="float64", seed=3)
    trainer = hf_trainer(tmp_path, [callback, record], max_steps=6)
    trainer.train()
    assert len(logged) == 1 and logged[0]["curvscope/step"] == 6 and logged[0]["curvscope/skipped"] == 0
    assert any("curvscope/sharpness" in entry for entry in trainer.state.log_history)  # the trainer's own log
    direct = client.analyze(trainer.model, (x, y), eigen=0, sharpness=True, learning_rate=LEARNING_RATE, trace=True,
                            precision="float64", seed=3)  # the callback's analyses and options
    for name, value in report_values(direct).items():
        assert logged[0][name] == pytest.approx(value, rel=1e-9), name
    assert logged[0]["curvscope/sharpness_limit"] == pytest.approx(2 / LEARNING_RATE)  # from the optimizer
    # Independent truth: the dense Hessian of the trained model; Lanczos stops at residual 1e-3.
    net = trainer.model.net
    dense = torch.linalg.eigvalsh(dense_hessian(net.double(), x.double(), y, nn.functional.cross_entropy))
    net.float()
    assert logged[0]["curvscope/sharpness"] == pytest.approx(dense[-1].item(), rel=1e-3)
    assert logged[0]["curvscope/gd_stable"] == float(dense[-1].item() <= 2 / LEARNING_RATE)


def test_hugging_face_training_goes_on_while_an_analysis_is_in_flight(tmp_path, client):
    transformers = framework("transformers")
    from curvscope.callbacks.transformers import CurvscopeCallback

    x, y = evaluation_batch()
    gated = GatedClient(client)
    callback = CurvscopeCallback({"inputs": x, "labels": y}, every_steps=1, client=gated, sharpness=True)
    seen: list[tuple[int, bool, int]] = []

    weights_at_step_1 = {}

    class ReleaseAtTheLastStep(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append((state.global_step, callback.monitor.busy(), callback.monitor.skipped))
            if state.global_step == 1:
                weights_at_step_1.update({k: v.clone() for k, v in kwargs["model"].state_dict().items()})
            if state.global_step == 5:
                gated.release.set()

    record, logged = recorder()
    trainer = hf_trainer(tmp_path, [callback, ReleaseAtTheLastStep(), record], max_steps=5)
    trainer.train()
    # Steps 2-5 ran while the analysis of step 1 was held open: each was skipped and counted.
    assert seen == [(1, True, 0), (2, True, 1), (3, True, 2), (4, True, 3), (5, True, 4)]
    assert callback.monitor.started == 1 and len(logged) == 1
    assert logged[0]["curvscope/step"] == 1 and logged[0]["curvscope/skipped"] == 4
    # The weights analysed are step 1's, though training had moved on when they were sent.
    at_step_1 = HFClassifier()
    at_step_1.load_state_dict(weights_at_step_1)
    assert not torch.equal(at_step_1.net[0].weight, trainer.model.net[0].weight)
    direct = client.analyze(at_step_1, (x, y), eigen=0, sharpness=True, learning_rate=LEARNING_RATE)
    assert logged[0]["curvscope/sharpness"] == pytest.approx(direct.results.sharpness.value, rel=1e-9)


def test_a_failed_gate_stops_hugging_face_training(tmp_path, client):
    transformers = framework("transformers")
    from curvscope.callbacks.transformers import CurvscopeCallback

    x, y = evaluation_batch()
    # The callback asks for sharpness; the policy adds the analysis its check reads.
    policy = parse_policy('[analyses.hessian_eigen]\ntop_k = 2\n[[checks]]\nname = "flat"\n'
                          'path = "results.hessian_eigen.largest[1]"\nfail = { max = 1e-9 }\n')
    callback = CurvscopeCallback({"inputs": x, "labels": y}, every_steps=2, client=client, stop_policy=policy)

    class WaitForTheAnalysis(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            callback.monitor.wait()  # the report of step 2 is in before step 3 ends

    trainer = hf_trainer(tmp_path, [callback, WaitForTheAnalysis()], max_steps=20)
    trainer.train()
    assert trainer.state.global_step == 3  # collected at the end of step 3, which then stopped
    first = callback.monitor.history[0]
    assert first.gate.status == "fail" and len(first.report.results.hessian_eigen.largest) == 2
    assert first.report.results.sharpness.value > 0


def test_hugging_face_callback_every_epoch(tmp_path, client):
    transformers = framework("transformers")
    from curvscope.callbacks.transformers import CurvscopeCallback

    x, y = evaluation_batch()
    callback = CurvscopeCallback({"inputs": x, "labels": y}, every_epochs=1, client=client, sharpness=True)

    class WaitForTheAnalysis(transformers.TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            callback.monitor.wait()  # no epoch's analysis is skipped

    record, logged = recorder()
    trainer = hf_trainer(tmp_path, [callback, WaitForTheAnalysis(), record], max_steps=-1)
    trainer.args.num_train_epochs = 2
    trainer.train()
    assert [entry["curvscope/step"] for entry in logged] == [8, 16]  # 64 samples in batches of 8
    assert callback.monitor.skipped == 0


# -- Lightning ------------------------------------------------------------------------------------
def lightning_parts() -> tuple[Any, Any]:
    pl = framework("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(1)
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LEARNING_RATE)

    class Recorder(pl.loggers.Logger):
        def __init__(self) -> None:
            super().__init__()
            self.logged: list[tuple[int, dict[str, float]]] = []

        name, version = "recorder", 0

        def log_metrics(self, metrics, step=None):
            if any(key.startswith("curvscope/") for key in metrics):
                self.logged.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    return Module, Recorder


def lightning_loader() -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(9)
    x, y = torch.randn(64, 5, generator=generator), torch.randint(0, 3, (64,), generator=generator)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def test_lightning_callback_logs_what_a_direct_analysis_reports(tmp_path):
    pl = framework("lightning.pytorch")
    Module, Recorder = lightning_parts()
    from curvscope import analyze
    from curvscope.callbacks.lightning import CurvscopeCallback

    x, y = evaluation_batch()
    callback = CurvscopeCallback((x, y), every_steps=4, local=True, sharpness=True, non_uniformity=True,
                                 eigen=2, precision="float64", seed=2)
    logger = Recorder()
    module = Module()
    trainer = pl.Trainer(max_steps=4, callbacks=[callback], logger=logger, accelerator="cpu", devices=1,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(tmp_path))
    trainer.fit(module, lightning_loader())
    assert len(logger.logged) == 1
    step, values = logger.logged[0]
    assert step == 4 and values["curvscope/step"] == 4
    direct = analyze(module, (x, y), local=True, sharpness=True, non_uniformity=True, learning_rate=LEARNING_RATE,
                     batch_size=16, eigen=2, precision="float64", seed=2)
    assert direct.results.non_uniformity.batch_size == 16  # the loader's batch size
    for name, value in report_values(direct).items():
        assert values[name] == pytest.approx(value, rel=1e-9), name
    assert float(trainer.callback_metrics["curvscope/sharpness"]) == pytest.approx(values["curvscope/sharpness"])
    dense = torch.linalg.eigvalsh(dense_hessian(module.net.double(), x.double(), y, nn.functional.cross_entropy))
    assert values["curvscope/eigen_0"] == pytest.approx(dense[-1].item(), rel=1e-3)
    assert values["curvscope/eigen_1"] == pytest.approx(dense[-2].item(), rel=1e-3)


def test_lightning_training_goes_on_while_an_analysis_is_in_flight(tmp_path, client):
    pl = framework("lightning.pytorch")
    Module, Recorder = lightning_parts()
    from curvscope.callbacks.lightning import CurvscopeCallback

    x, y = evaluation_batch()
    gated = GatedClient(client)
    callback = CurvscopeCallback((x, y), every_steps=1, client=gated, sharpness=True)
    seen: list[tuple[int, bool, int]] = []

    class ReleaseAtTheLastStep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.global_step, callback.monitor.busy(), callback.monitor.skipped))
            if trainer.global_step == 4:
                gated.release.set()

    logger = Recorder()
    trainer = pl.Trainer(max_steps=4, callbacks=[callback, ReleaseAtTheLastStep()], logger=logger,
                         accelerator="cpu", devices=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(Module(), lightning_loader())
    assert seen == [(1, True, 0), (2, True, 1), (3, True, 2), (4, True, 3)]
    assert callback.monitor.started == 1
    assert [(values["curvscope/step"], values["curvscope/skipped"]) for _, values in logger.logged] == [(1, 3)]


def test_lightning_callback_every_epoch(tmp_path, client):
    pl = framework("lightning.pytorch")
    Module, Recorder = lightning_parts()
    from curvscope.callbacks.lightning import CurvscopeCallback

    x, y = evaluation_batch()
    callback = CurvscopeCallback((x, y), every_epochs=1, client=client, sharpness=True)

    class WaitForTheAnalysis(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            callback.monitor.wait()  # no epoch's analysis is skipped

    logger = Recorder()
    trainer = pl.Trainer(max_epochs=2, callbacks=[callback, WaitForTheAnalysis()], logger=logger, accelerator="cpu",
                         devices=1, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(Module(), lightning_loader())
    assert [values["curvscope/step"] for _, values in logger.logged] == [4, 8]  # 64 samples in batches of 16
    assert callback.monitor.skipped == 0


def test_the_monitor_needs_an_analysis_and_one_place_to_run():
    x, y = evaluation_batch()
    with pytest.raises(ValueError, match="at least one analysis"):
        CurvatureMonitor((x, y), sharpness=False)
    with pytest.raises(ValueError, match="leave out server"):
        CurvatureMonitor((x, y), local=True, server="localhost:1")
