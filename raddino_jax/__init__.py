"""raddino_jax: RAD-DINO-style (DINOv2 recipe) self-supervised pretraining in JAX/Flax.

Citations in the code: "recipe sN" is section sN of docs/recipe.md (every number of the
recipe with its source), "pitfall N" its checklist item N; docs/architecture.md and
docs/conventions.md describe the layout and the house conventions.
"""

__version__ = "0.1.0"
