"""Checkpoints on disk: load every official LLaVA layout, save layout A and stage-1 projectors, and write
small random checkpoints in each layout. Key names live in weights/keymaps.py."""
from minillava.weights.load import CheckpointError, load_llava
from minillava.weights.random_checkpoint import random_llava, write_layout, write_random_checkpoint
from minillava.weights.save import save_llava, save_projector
