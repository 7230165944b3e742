"""ComfyUI-SynCD: SynCD, JeDi and DCI/ICO subject customization for ComfyUI.

ComfyUI imports this package from ``custom_nodes/`` under its folder name and
calls :func:`comfy_entrypoint`. Importing the package itself (as
``comfyui_syncd`` for the command line, the client or the pure ``attention``
core) does not import ComfyUI.
"""

WEB_DIRECTORY = None


async def comfy_entrypoint():
    """V3 entry point: ComfyUI calls this once when it loads the pack: the production nodes and the demo nodes."""
    from comfy_api.latest import ComfyExtension

    from .demo.nodes import DEMO_NODES
    from .nodes import NODES

    class SynCDExtension(ComfyExtension):
        async def get_node_list(self):
            return [*NODES, *DEMO_NODES]

    return SynCDExtension()
