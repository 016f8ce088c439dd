"""The bottom layer both processes share: the dataset store's layout and reader/writer, atomic file
writes, the DSR type table.

Standard library, numpy, yaml and tensorstore only: no JAX, no PyTorch, nothing else of the project
(tests/layering.py checks it), so the PyTorch scoring process imports it as freely as the trainer.
"""
