"""SynCD synthetic dataset generation: prompts, meshes, and the driver that queues the shipped workflows."""
