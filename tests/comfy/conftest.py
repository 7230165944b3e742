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


def _split_calc(reverse: bool = False, every_other: bool = False):
    """A ``CALC_COND_BATCH`` wrapper that runs every cond in its own forward pass (in reverse order when asked), as
    ComfyUI does when memory is short; with ``every_other`` only on every second call (the layout then changes from
    step to step). A wrapper reaches every ``calc_cond_batch``: KSampler's and any guider's."""
    calls = []

    def wrapper(executor, model, conds, x_in, timestep, model_options):
        calls.append(1)
        if every_other and len(calls) % 2:
            return executor(model, conds, x_in, timestep, model_options)
        order = list(range(len(conds)))[::-1] if reverse else range(len(conds))
        outs = [None] * len(conds)
        for i in order:
            outs[i] = executor(model, [conds[i]], x_in, timestep, model_options)[0]
        return outs
    return wrapper


def _with_calc_wrapper(model, wrapper):
    import comfy.patcher_extension

    model = model.clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test_layout", wrapper)
    return model


@pytest.fixture
def separate_passes():
    """``separate_passes(model, reverse=False)`` -> a clone whose conds run in separate forward passes."""
    return lambda model, reverse=False: _with_calc_wrapper(model, _split_calc(reverse))


@pytest.fixture
def alternating_passes():
    """``alternating_passes(model)`` -> a clone whose batch layout alternates between joint and separate passes."""
    return lambda model: _with_calc_wrapper(model, _split_calc(reverse=True, every_other=True))


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    """Every tiny model family (sd15, sdxl, flux); a test narrows it with ``pytest.mark.parametrize("family", ...)``."""
    return request.param


@pytest.fixture(scope="session")
def families() -> list[str]:
    return list(FAMILIES)
