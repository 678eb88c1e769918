"""Architectures contributed by installed packages (entry-point group ``curvscope.architectures``).

A plugin package declares, e.g. in its pyproject.toml::

    [project.entry-points."curvscope.architectures"]
    resnet8 = "mypkg.models:build_resnet8"

and ``build_resnet8(config: dict) -> torch.nn.Module`` builds the module whose state dict the
safetensors checkpoint holds.

The plugin's code is trusted (the operator installs it) but its config comes from the user, so
the service calls the factory twice: first under ``torch.device("meta")``, where tensors have
shapes and no memory, to count the parameters and match the shapes against the file before
anything is allocated; then, once those checks pass, on the CPU. A factory must therefore build
on the meta device: create tensors without an explicit device and never read their values
(``.item()``, ``.tolist()``, numpy) while building.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

from torch import nn

from curvscope_service.errors import CurvscopeError, InvalidInput
from curvscope_service.loading.messages import one_line

GROUP = "curvscope.architectures"


def available() -> dict[str, EntryPoint]:
    """Installed plugin architectures by name (scanned on every call: plugins can be installed at runtime)."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def build(name: str, config: dict) -> nn.Module:
    """Build plugin architecture ``name`` from ``config``."""
    found = available().get(name)
    if found is None:
        raise KeyError(name)
    try:
        factory = found.load()
    except Exception as e:  # a broken plugin must not take the service down
        raise InvalidInput(f"architecture plugin '{name}' ({found.value}) failed to import: {one_line(e)}") from None
    try:
        module = factory(config)
    except CurvscopeError:
        raise  # the factory's own message for the user (e.g. a refused config), with its status
    except Exception as e:
        raise InvalidInput(f"architecture plugin '{name}' could not build a model from this config: {one_line(e)}") from None
    if not isinstance(module, nn.Module):
        raise InvalidInput(
            f"architecture plugin '{name}' returned {type(module).__name__}, not a torch.nn.Module; fix its factory"
        )
    return module
