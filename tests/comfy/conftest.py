"""In-process ComfyUI: import its modules on the CPU and build tiny real-architecture models."""

import pytest

FAMILIES = ["sd15", "sdxl", "flux"]


@pytest.fixture(scope="session", autouse=True)
def comfy_imports(comfy_path):
    """ComfyUI on sys.path with --cpu set before anything imports comfy.model_management."""
    from comfyui_syncd.comfy_inprocess import import_comfy

    return import_comfy(cpu=True)


@pytest.fixture(scope="session")
def tiny():
    from comfyui_syncd.demo import tiny_models

    return tiny_models


def _separate_passes_hook(reverse: bool = False):
    """A ``sampler_calc_cond_batch_function`` that runs every cond in its own forward pass (in reverse order when
    asked), as ComfyUI does when memory is short."""
    import comfy.samplers

    def calc(args):
        conds, model, x, sigma, options = args["conds"], args["model"], args["input"], args["sigma"], \
            args["model_options"]
        order = list(range(len(conds)))[::-1] if reverse else range(len(conds))
        outs = [None] * len(conds)
        for i in order:
            outs[i] = comfy.samplers.calc_cond_batch(model, [conds[i]], x, sigma, options)[0]
        return outs
    return calc


def _alternating_passes_hook():
    """Joint batches on even calls, separate passes on odd ones: the layout changes from step to step."""
    import comfy.samplers

    calls = []

    def calc(args):
        calls.append(1)
        if len(calls) % 2:
            return comfy.samplers.calc_cond_batch(args["model"], args["conds"], args["input"], args["sigma"],
                                                  args["model_options"])
        return _separate_passes_hook(reverse=True)(args)
    return calc


@pytest.fixture
def separate_passes():
    """``separate_passes(reverse=False)`` -> model options whose conds run in separate forward passes."""
    return lambda reverse=False: {"sampler_calc_cond_batch_function": _separate_passes_hook(reverse)}


@pytest.fixture
def alternating_passes():
    """``alternating_passes()`` -> model options whose batch layout alternates between calls."""
    return lambda: {"sampler_calc_cond_batch_function": _alternating_passes_hook()}


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    """Every tiny model family (sd15, sdxl, flux); a test narrows it with ``pytest.mark.parametrize("family", ...)``."""
    return request.param


@pytest.fixture(scope="session")
def families() -> list[str]:
    return list(FAMILIES)
