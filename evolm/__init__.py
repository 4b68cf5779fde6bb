"""evolm: keep a language model learning, one stage of data at a time.

For each stage, DEAP evolves LoRA / training genomes, Ray evaluates them with real
fine-tunes, and the winner is merged into the model that becomes the next base.
"""

__version__ = "0.1.0"
