"""The PyTorch scoring process: text encoding, VAE decode, detection + tracking, DSR-Score, metrics.

Run it as ``python -m scoring {create-store,encode-prompts,score,evaluate}``. Importing this
package is light (no torch): modules that need PyTorch import it themselves.
"""
